"""DeepSeek's original Janus layout loads onto the same modules and gives the same numbers."""

import pytest
import torch
from builders.janus import write_original_layout
from janus_reference import chat_inputs, ours


@pytest.mark.parametrize("weights,shards", [("bin", 1), ("bin", 2), ("safetensors", 3)])
def test_original_layout_gives_the_same_logits_as_its_transformers_twin(janus_dir, tmp_path, sample_images,
                                                                         weights, shards):
    original = write_original_layout(janus_dir, tmp_path / "original", weights=weights, shards=shards)
    processor, model = ours(str(janus_dir))
    original_processor, original_model = ours(str(original))
    messages = [{"role": "user", "content": [{"type": "image", "image": sample_images["square"]},
                                             {"type": "text", "text": "What is it?"}]}]
    inputs, original_inputs = chat_inputs(processor, messages), chat_inputs(original_processor, messages)
    assert torch.equal(inputs["input_ids"], original_inputs["input_ids"])
    assert torch.equal(inputs["pixel_values"], original_inputs["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, original_model(**original_inputs).logits)
    assert model.generate(**inputs, max_new_tokens=16).tolist() == \
        original_model.generate(**original_inputs, max_new_tokens=16).tolist()
    image_inputs = processor(text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "A cat."}]}], add_generation_prompt=True),
        generation_mode="image")
    assert model.generate(**image_inputs, generation_mode="image", do_sample=False).tolist() == \
        original_model.generate(**image_inputs, generation_mode="image", do_sample=False).tolist()


def test_original_processor_truncates_the_resized_side_like_deepseek(janus_original_dir):
    from vlmkit import JanusProcessor
    processor = JanusProcessor.from_pretrained(janus_original_dir)
    assert processor.image_processor.resize_rounding == "floor"
    assert processor.use_default_system_prompt
    from PIL import Image
    resized = processor.image_processor.resize(Image.new("RGB", (45, 23)))
    assert resized.size == (32, int(23 * 32 / 45))


def test_an_original_layout_processor_saved_and_loaded_back_is_the_same_processor(janus_original_dir, tmp_path):
    """The folder's layout is told by its config.json, which a processor's files do not hold: the saved
    processor keeps DeepSeek's prompt (default system prompt) and resizing, and an edit of the former."""
    from vlmkit import JanusProcessor
    processor = JanusProcessor.from_pretrained(janus_original_dir)
    processor.save_pretrained(tmp_path / "saved")
    reloaded = JanusProcessor.from_pretrained(tmp_path / "saved")
    from PIL import Image
    image = Image.linear_gradient("L").convert("RGB").resize((45, 25))  # 25 * 32 / 45 = 17.8: rounding differs
    call = {"text": "<image_placeholder>\nWhat is it?", "images": image}
    expected, got = processor(**call), reloaded(**call)
    assert reloaded.image_processor.resize_rounding == "floor"
    assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["pixel_values"],
                                                                                 expected["pixel_values"])
    processor.use_default_system_prompt = False
    processor.save_pretrained(tmp_path / "edited")
    assert not JanusProcessor.from_pretrained(tmp_path / "edited").use_default_system_prompt


def test_convert_rewrites_bin_weights_as_safetensors(janus_original_dir, tmp_path):
    from vlmkit.cli import main
    from vlmkit import JanusForConditionalGeneration
    assert main(["convert", str(janus_original_dir), str(tmp_path / "st")]) == 0
    assert (tmp_path / "st" / "model.safetensors").is_file()
    assert not list((tmp_path / "st").glob("*.bin"))
    converted = JanusForConditionalGeneration.from_pretrained(tmp_path / "st", dtype=torch.float32)
    original = JanusForConditionalGeneration.from_pretrained(janus_original_dir, dtype=torch.float32)
    for (name, a), (_, b) in zip(converted.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name


def test_multi_modality_without_generation_sections_is_refused(janus_original_dir, tmp_path):
    import json
    import shutil
    from vlmkit import AutoModel, CheckpointError
    folder = tmp_path / "deepseek_vl"
    shutil.copytree(janus_original_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("gen_vision_config", "gen_aligner_config", "gen_head_config"):
        config.pop(key)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="Janus"):
        AutoModel.from_pretrained(folder)


def test_deepseek_vlchat_processor_call_style(janus_original_dir, sample_images):
    """DeepSeek's VLChatProcessor example: conversations with <image_placeholder>, batched and padded."""
    processor, model = ours(str(janus_original_dir))
    conversation = [{"role": "<|User|>", "content": "<image_placeholder>\nDescribe this image.",
                     "images": ["./examples/image.png"]}, {"role": "<|Assistant|>", "content": ""}]
    inputs = processor(conversations=conversation, images=[sample_images["square"]], force_batchify=True)
    tokens = model.num_image_tokens
    assert inputs["pixel_values"].shape == (1, 1, 3, 32, 32)
    assert int(inputs["images_seq_mask"].sum()) == tokens
    assert inputs["sft_format"][0].endswith("<|User|>: <image_placeholder>\nDescribe this image.\n\n<|Assistant|>:")
    # the same prompt through the chat template gives the same ids
    messages = [{"role": "user", "content": [{"type": "image", "image": sample_images["square"]},
                                             {"type": "text", "text": "Describe this image."}]}]
    assert torch.equal(inputs["input_ids"], chat_inputs(processor, messages)["input_ids"])
    second = [{"role": "<|User|>", "content": "<image_placeholder><image_placeholder> Compare."},
              {"role": "<|Assistant|>", "content": ""}]
    batch = processor(conversations=[conversation, second],
                      images=[[sample_images["wide"]], [sample_images["tall"], sample_images["square"]]])
    assert batch["pixel_values"].shape[:2] == (2, 2)
    assert batch["images_emb_mask"][:, :, 0].tolist() == [[True, False], [True, True]]
    assert batch["attention_mask"][0, 0] == 0  # left padded
    out = model.generate(**batch, max_new_tokens=6)
    for row, (conv, images) in enumerate([(conversation, [sample_images["wide"]]),
                                          (second, [sample_images["tall"], sample_images["square"]])]):
        alone = model.generate(**processor(conversations=conv, images=images), max_new_tokens=6)
        assert alone[0, -6:].tolist() == out[row, -6:].tolist()


TEXT_ONLY = [{"role": "<|User|>", "content": "A red cube."}, {"role": "<|Assistant|>", "content": ""}]
WITH_IMAGE = [{"role": "<|User|>", "content": "<image_placeholder>\nWhat?"}, {"role": "<|Assistant|>", "content": ""}]


def test_vlchat_without_images_keeps_one_masked_off_image_slot(janus_original_dir, sample_images):
    """DeepSeek's batchify makes max(1, most images) slots: with no image, pixel_values [B, 1, 3, S, S] of
    zeros and images_emb_mask [B, 1, N] all False, which its model's prepare_inputs_embeds skips."""
    processor, model = ours(str(janus_original_dir))
    inputs = processor(conversations=TEXT_ONLY, images=[])
    assert inputs["pixel_values"].shape == (1, 1, 3, 32, 32) and not inputs["pixel_values"].any()
    assert inputs["images_emb_mask"].shape == (1, 1, model.num_image_tokens) and not inputs["images_emb_mask"].any()
    assert not inputs["images_seq_mask"].any()
    batch = processor(conversations=[WITH_IMAGE, TEXT_ONLY], images=[[sample_images["wide"]], []])
    assert batch["pixel_values"].shape == (2, 1, 3, 32, 32)
    assert batch["images_emb_mask"][:, 0, 0].tolist() == [True, False]
    out = model.generate(**batch, max_new_tokens=4)
    alone = model.generate(**processor(conversations=WITH_IMAGE, images=[sample_images["wide"]]), max_new_tokens=4)
    assert out[0, -4:].tolist() == alone[0, -4:].tolist()
    text_alone = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4)
    assert out[1, -4:].tolist() == text_alone[0, -4:].tolist()


def test_the_model_takes_a_vlchat_batch_without_images(janus_original_dir):
    """DeepSeek's model runs on such a batch (the masked-off slot is never written); so must ours."""
    processor, model = ours(str(janus_original_dir))
    inputs = processor(conversations=TEXT_ONLY, images=[])
    plain = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**plain).logits)
    assert model.generate(**inputs, max_new_tokens=4).tolist() == model.generate(**plain, max_new_tokens=4).tolist()


def test_vlchat_without_batchify_returns_deepseeks_prepared_sample(janus_original_dir, sample_images):
    """force_batchify=False gives what DeepSeek's process_one returns: sft_format (str), input_ids [N],
    pixel_values [n, 3, S, S] (an empty 1-D tensor with no image) and num_image_tokens [n] (int32)."""
    processor, model = ours(str(janus_original_dir))
    sample = processor(conversations=WITH_IMAGE, images=[sample_images["tall"]], force_batchify=False)
    batch = processor(conversations=WITH_IMAGE, images=[sample_images["tall"]])
    assert set(sample) == {"sft_format", "input_ids", "pixel_values", "num_image_tokens"}
    assert sample["sft_format"] == batch["sft_format"][0]
    assert torch.equal(sample["input_ids"], batch["input_ids"][0])
    assert torch.equal(sample["pixel_values"], batch["pixel_values"][0])
    assert sample["num_image_tokens"].dtype == torch.int32 and sample["num_image_tokens"].tolist() == [model.num_image_tokens]
    empty = processor(conversations=TEXT_ONLY, images=[], force_batchify=False)
    assert empty["pixel_values"].shape == (0,) and empty["num_image_tokens"].shape == (0,)
    assert empty["input_ids"].ndim == 1


def test_vlchat_content_blocks_are_refused_with_the_way_to_pass_them(janus_original_dir):
    """DeepSeek's process_one calls content.strip() (an AttributeError on a list); we say what to do instead
    of writing the list's repr into the prompt."""
    from vlmkit.errors import InputError
    processor, _ = ours(str(janus_original_dir))
    blocks = [{"role": "<|User|>", "content": [{"type": "text", "text": "hi"}]}, {"role": "<|Assistant|>", "content": ""}]
    with pytest.raises(InputError, match=r"content of type list.*apply_chat_template"):
        processor(conversations=blocks, images=[])
    with pytest.raises(InputError, match="content of type NoneType"):
        processor(conversations=[{"role": "<|User|>", "content": None}], images=[])
