"""A processor's files: the tokenizer's padding side as loaded and set, and what save_pretrained writes, loaded
back as the same processor (by vlmkit and by transformers)."""

import pytest
import torch

from vlmkit import AutoProcessor, JanusForConditionalGeneration


def test_processor_from_pretrained_sets_the_tokenizers_padding_side_as_transformers(llava_onevision_dir, sample_images):
    from builders.llava_onevision import reference_processor

    from vlmkit import LlavaOnevisionProcessor

    ours = LlavaOnevisionProcessor.from_pretrained(llava_onevision_dir, padding_side="left")
    reference = reference_processor(llava_onevision_dir)
    reference.tokenizer.padding_side = "left"  # what transformers' from_pretrained(padding_side="left") sets
    texts = ["<|im_start|>user hi<|im_end|>", "<|im_start|>user what is in the picture?<|im_end|>"]
    got, want = ours(text=texts, padding=True), reference(text=texts, padding=True, return_tensors="pt")
    assert got["input_ids"].tolist() == want["input_ids"].tolist() and got["attention_mask"][0, 0] == 0
    assert transformers_padding_side(llava_onevision_dir) == ours.tokenizer.padding_side == "left"


@pytest.mark.parametrize("how", ["attribute", "from_pretrained"])
def test_janus_pads_on_the_side_the_tokenizer_is_set_to_as_transformers(janus_dir, how):
    """Fine-tuning code sets the tokenizer's padding side after loading, or passes it to from_pretrained."""
    import transformers

    from vlmkit import JanusProcessor

    options = {"padding_side": "right"} if how == "from_pretrained" else {}
    ours = JanusProcessor.from_pretrained(janus_dir, **options)
    reference = transformers.AutoProcessor.from_pretrained(str(janus_dir), backend="pil", **options)
    if how == "attribute":
        ours.tokenizer.padding_side = reference.tokenizer.padding_side = "right"
    texts = ["a", "b c d e f g"]
    got, want = ours(text=texts, padding=True), reference(text=texts, padding=True, return_tensors="pt")
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["attention_mask"].tolist() == want["attention_mask"].tolist()


def transformers_padding_side(folder) -> str:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder), padding_side="left").padding_side


@pytest.mark.parametrize("fixture", ["janus_dir", "llava_onevision_dir", "idefics_resampler_dir"])
def test_processor_save_pretrained_writes_files_that_load_back_as_the_same_processor(fixture, request, tmp_path,
                                                                                   sample_images):
    import transformers

    folder = request.getfixturevalue(fixture)
    processor = AutoProcessor.from_pretrained(folder, padding_side="left")
    processor.save_pretrained(tmp_path / "processor")
    again = AutoProcessor.from_pretrained(tmp_path / "processor")
    assert again.tokenizer.padding_side == "left"  # the setting it was saved with
    conversation = [{"role": "user", "content": [{"type": "image", "image": sample_images["square"]},
                                                 {"type": "text", "text": "What is it?"}]}]
    call = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    first, second = processor.apply_chat_template(conversation, **call), again.apply_chat_template(conversation, **call)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # transformers reads the saved folder too
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "processor")).padding_side == "left"


def test_a_processor_saved_before_its_model_keeps_its_edits(janus_dir, tmp_path):
    """transformers code saves both into one folder, processor first: the model's save must not put the
    source checkpoint's tokenizer files back over the processor's (an edited padding side, chat template)."""
    import transformers
    from vlmkit import JanusForConditionalGeneration

    processor = AutoProcessor.from_pretrained(janus_dir)
    model = JanusForConditionalGeneration.from_pretrained(janus_dir)
    processor.tokenizer.padding_side = "right"
    processor.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    processor.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert again.tokenizer.padding_side == "right" and again.chat_template == processor.chat_template
    reference = transformers.AutoProcessor.from_pretrained(str(tmp_path))
    assert reference.tokenizer.padding_side == "right" and reference.chat_template == processor.chat_template


def test_a_janus_folder_without_processor_files_takes_the_vision_towers_size(janus_dir, tmp_path, sample_images):
    """Without processor_config.json the class defaults (384 pixels, 576 image tokens) would not fit a
    checkpoint of another size: the prompt outgrew the context or the features mismatched."""
    import shutil

    from vlmkit import JanusProcessor

    folder = shutil.copytree(janus_dir, tmp_path / "no_processor_files")
    for name in ("processor_config.json", "preprocessor_config.json"):
        (folder / name).unlink(missing_ok=True)
    full, bare = JanusProcessor.from_pretrained(janus_dir), JanusProcessor.from_pretrained(folder)
    assert (bare.num_image_tokens, bare.image_processor.size) == (full.num_image_tokens, full.image_processor.size)
    model = JanusForConditionalGeneration.from_pretrained(folder)
    inputs = bare(text="<image_placeholder> What is it?", images=sample_images["square"])
    assert model.generate(**inputs, max_new_tokens=2).shape[1] == inputs["input_ids"].shape[1] + 2
