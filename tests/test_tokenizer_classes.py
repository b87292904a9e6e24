"""vlmkit's tokenizer gives transformers 5's ids and text for the tokenizer classes real checkpoints name.

transformers 5 rebuilds the pipeline of some classes instead of using tokenizer.json as written:
IDEFICS' ``LlamaTokenizer`` over a sentencepiece-style file (Metaspace chosen by ``legacy`` and
``add_prefix_space``, "left" padding), LLaVA-OneVision's ``Qwen2TokenizerFast``; Janus-Pro's
``LlamaTokenizerFast`` over a byte-level file falls back to the file as written. The folders are built
offline in the real files' shapes (builders/tokenizer_classes.py) and every answer is transformers'.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from builders.tokenizer_classes import (config_token, janus_tokenizer_json, llama_sp_tokenizer_json,
                                        qwen2_tokenizer_json, with_tokenizer, write_tokenizer_folder)
from vlmkit.io.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
ONEVISION_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
JANUS_BOS, JANUS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# where the pipelines part: a leading space, text right after a special token, a text starting with one,
# newlines, runs of spaces, byte-fallback characters (emoji, CJK), an empty text
TEXTS = ["Hello world", " Hello world", "  two spaces", "Hello\nworld\n\nend", "<image>world", "x<image> y",
         "<s>Hello", "User: hi<end_of_utterance>\nAssistant:", "<|im_start|>user\nWhat?<|im_end|>\n",
         "<fake_token_around_image><image><fake_token_around_image>What is this?", "emoji 🙂 and 日本語 Café",
         "", " ", "\n", "a  b   c", "The dog.</s>", "trailing ", "\tTabs\tand ünïcödé\r\n"]


def _answers(tokenizer) -> dict:
    """What a user reads off a tokenizer for every text: ids, tokens, decoded text, padded batches."""
    out = {"padding_side": tokenizer.padding_side, "len": len(tokenizer),
           "all_special_tokens": sorted(tokenizer.all_special_tokens)}
    for text in TEXTS:
        ids = tokenizer.encode(text)
        out[text] = {"ids": ids, "plain_ids": tokenizer.encode(text, add_special_tokens=False),
                     "tokenize": tokenizer.tokenize(text), "tokens": tokenizer.convert_ids_to_tokens(ids),
                     "string": tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)),
                     "decode": tokenizer.decode(ids), "decode_skip": tokenizer.decode(ids, skip_special_tokens=True)}
    if tokenizer.pad_token is not None:
        batch = tokenizer(TEXTS[:6], padding=True)
        out["batch"] = {key: list(batch[key]) for key in ("input_ids", "attention_mask")}
        out["batch_decode"] = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    out["truncated"] = list(tokenizer(TEXTS[:6], truncation=True, max_length=4)["input_ids"])
    return out


def _llama_config(**settings) -> dict:
    """IDEFICS' tokenizer_config.json (saved before transformers 4.34) with ``settings`` (legacy...)."""
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": config_token("<s>"),
              "clean_up_tokenization_spaces": False, "eos_token": config_token("</s>"),
              "model_max_length": 1000000000000000019884624838656, "pad_token": "<unk>", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", "unk_token": config_token("<unk>"),
              "additional_special_tokens": IDEFICS_TOKENS}
    return {key: value for key, value in {**config, **settings}.items() if value != "absent"}


def _onevision_config(tokens_json: dict, **settings) -> dict:
    """llava-hf/llava-onevision-qwen2-*-hf's tokenizer_config.json with ``settings``."""
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": _added_tokens_decoder(tokens_json),
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
              "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "model_max_length": 32768, "pad_token": "<|endoftext|>", "processor_class": "LlavaOnevisionProcessor",
              "split_special_tokens": False, "tokenizer_class": "Qwen2TokenizerFast", "unk_token": None,
              "image_token": "<image>", "video_token": "<video>"}
    return {key: value for key, value in {**config, **settings}.items() if value != "absent"}


# name -> (tokenizer.json kind, tokenizer_config.json, config.json model type); "absent" leaves a key out
VARIANTS = {
    **{f"llama legacy={legacy} add_prefix_space={space}": (
        "llama", _llama_config(legacy=legacy, add_prefix_space=space,
                               tokenizer_class="LlamaTokenizerFast" if space else "LlamaTokenizer"), "idefics")
       for legacy in ("absent", False, True) for space in ("absent", True, False)},
    # transformers 5 drops add_bos_token/add_eos_token where a tokenizer.json exists: its post-processor rules
    "llama add_bos_token=False add_eos_token=True": ("llama", _llama_config(add_bos_token=False, add_eos_token=True),
                                                     "idefics"),
    "llama without tokenizer_class (the model type picks it)": (
        "llama", {k: v for k, v in _llama_config().items() if k != "tokenizer_class"}, "idefics"),
    "llama padding_side=right": ("llama", _llama_config(padding_side="right"), "idefics"),
    "llama file, generic class": ("llama", _llama_config(tokenizer_class="PreTrainedTokenizerFast"), "idefics"),
    "qwen2": ("qwen2", None, "llava_onevision"),
    "qwen2 add_prefix_space=True": ("qwen2", {"add_prefix_space": True}, "llava_onevision"),
    "qwen2 add_prefix_space absent": ("qwen2", {"add_prefix_space": "absent"}, "llava_onevision"),
    **{f"janus LlamaTokenizerFast add_bos_token={bos}": ("janus", {
        "add_bos_token": bos, "add_eos_token": False, "bos_token": config_token(JANUS_BOS), "legacy": True,
        "eos_token": config_token(JANUS_EOS), "pad_token": config_token(JANUS_EOS), "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast", "unk_token": None, "use_default_system_prompt": True}, "janus")
       for bos in (True, False)},
    # without a class named, IDEFICS' model type picks LlamaTokenizer, byte-level file or not
    "janus file in an idefics folder without tokenizer_class": ("janus", {
        "bos_token": JANUS_BOS, "eos_token": JANUS_EOS, "pad_token": JANUS_EOS, "unk_token": None}, "idefics"),
}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict:
    """Each kind's tokenizer.json, trained once."""
    scratch = tmp_path_factory.mktemp("janus_tokenizer")
    return {"llama": llama_sp_tokenizer_json(IDEFICS_TOKENS), "qwen2": qwen2_tokenizer_json(ONEVISION_TOKENS),
            "janus": janus_tokenizer_json(scratch, ["<image_placeholder>", "<begin_of_image>", "<end_of_image>"],
                                          JANUS_BOS, JANUS_EOS)}


@pytest.fixture(params=list(VARIANTS))
def tokenizer_folder(request, tokenizer_files, tmp_path_factory):
    kind, config, model_type = VARIANTS[request.param]
    if kind == "qwen2":
        config = _onevision_config(tokenizer_files["qwen2"], **(config or {}))
    return write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"), tokenizer_files[kind], config, model_type)


def test_tokenizer_gives_transformers_ids_and_text_for_the_class_the_checkpoint_names(tokenizer_folder):
    reference = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
    assert _answers(Tokenizer.from_pretrained(tokenizer_folder)) == _answers(reference)


def test_tokenizer_pipeline_is_the_one_transformers_builds(tokenizer_folder):
    # the whole tokenizers pipeline (normalizer, pre-tokenizer, model options, post-processor, decoder), so a
    # text no test writes tokenizes the same too
    reference = json.loads(transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder)).backend_tokenizer.to_str())
    ours = json.loads(Tokenizer.from_pretrained(tokenizer_folder).backend.to_str())
    for pipeline in (reference, ours):
        del pipeline["truncation"], pipeline["padding"]  # set per call
    assert ours == reference


def test_saved_tokenizer_loads_back_in_transformers_with_the_same_answers(tokenizer_folder, tmp_path):
    ours = Tokenizer.from_pretrained(tokenizer_folder)
    ours.save_pretrained(tmp_path)
    shutil.copy(tokenizer_folder / "config.json", tmp_path)  # AutoTokenizer reads the model type there
    reference = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
    assert _answers(transformers.AutoTokenizer.from_pretrained(str(tmp_path))) == _answers(reference)
    assert _answers(Tokenizer.from_pretrained(tmp_path)) == _answers(reference)


def test_special_tokens_map_of_checkpoints_saved_before_added_tokens_decoder_is_read(tokenizer_files, tmp_path):
    # idefics-9b's files: pad and image tokens named in special_tokens_map.json only; transformers 5 reads it
    # when tokenizer_config.json has no added_tokens_decoder
    config = {k: v for k, v in _llama_config(pad_token=None).items() if k != "additional_special_tokens"}
    folder = write_tokenizer_folder(tmp_path, tokenizer_files["llama"], config, "idefics")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": IDEFICS_TOKENS, "bos_token": config_token("<s>"),
        "eos_token": config_token("</s>"), "pad_token": "<unk>", "unk_token": config_token("<unk>")}))
    reference, ours = transformers.AutoTokenizer.from_pretrained(str(folder)), Tokenizer.from_pretrained(folder)
    assert ours.pad_token == reference.pad_token == "<unk>"
    assert ours.special_tokens_map == reference.special_tokens_map
    assert _answers(ours) == _answers(reference)


def _added_tokens_decoder(tokens_json: dict, **flags_of) -> dict:
    """tokenizer_config.json's added_tokens_decoder for a tokenizer.json, with other flags for some tokens."""
    return {str(t["id"]): {**{k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")},
                           **flags_of.get(t["content"], {})} for t in tokens_json["added_tokens"]}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_added_token_flags_of_tokenizer_config_act_as_in_transformers(tokenizer_files, tmp_path, kind):
    # the config's flags win over tokenizer.json's, except that Qwen2Tokenizer adds its named special tokens
    # (<image> is one) again with the default flags
    tokens = tokenizer_files[kind]
    flags = {"<image>": {"lstrip": True, "rstrip": True}, "<end_of_utterance>": {"rstrip": True},
             "<|im_start|>": {"rstrip": True}}
    config = _llama_config() if kind == "llama" else _onevision_config(tokens)
    config["added_tokens_decoder"] = _added_tokens_decoder(tokens, **flags)
    folder = write_tokenizer_folder(tmp_path, tokens, config, "idefics" if kind == "llama" else "llava_onevision")
    reference, ours = transformers.AutoTokenizer.from_pretrained(str(folder)), Tokenizer.from_pretrained(folder)
    assert _answers(ours) == _answers(reference)


@pytest.mark.parametrize("change", ["split_special_tokens", "special tokens left out"])
def test_tokenizer_config_settings_beyond_the_file_act_as_in_transformers(tokenizer_files, tmp_path, change):
    tokens = tokenizer_files["qwen2"]
    config = _onevision_config(tokens)
    if change == "split_special_tokens":  # special tokens in the text tokenized as text
        config["split_special_tokens"] = True
    else:  # Qwen2Tokenizer's constructor defaults name <|endoftext|>
        for key in ("unk_token", "eos_token", "pad_token"):
            del config[key]
    folder = write_tokenizer_folder(tmp_path, tokens, config, "llava_onevision")
    reference, ours = transformers.AutoTokenizer.from_pretrained(str(folder)), Tokenizer.from_pretrained(folder)
    assert (ours.unk_token, ours.eos_token, ours.pad_token) == \
        (reference.unk_token, reference.eos_token, reference.pad_token)
    assert _answers(ours) == _answers(reference)


# --- the processors, with the real classes swapped into the tiny checkpoints ---------------------------------

def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8))


def _assert_same_features(got, expected):
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(expected[key])), key


@pytest.mark.parametrize("legacy", ["absent", False, True])
def test_idefics_processor_with_its_llama_tokenizer_matches_reference(idefics_plain_dir, tokenizer_files, tmp_path,
                                                                      legacy):
    from vlmkit.models.idefics import IdeficsProcessor

    config = {k: v for k, v in _llama_config(legacy=legacy, pad_token=None).items() if k != "additional_special_tokens"}
    names = {"additional_special_tokens": IDEFICS_TOKENS, "bos_token": "<s>", "eos_token": "</s>",
             "pad_token": "<unk>", "unk_token": "<unk>"}
    folder = with_tokenizer(idefics_plain_dir, tmp_path / "idefics", config, tokenizer_files["llama"], names)
    reference = transformers.AutoProcessor.from_pretrained(str(folder), backend="pil")
    ours = IdeficsProcessor.from_pretrained(folder)
    first, second = _image(40, 40, 0), _image(64, 20, 1)
    # text after <s>, after the image tokens, after <end_of_utterance>; a padded batch
    prompts = [["User:", first, "What is in the image?<end_of_utterance>\nAssistant:"],
               [["User: hi 🙂", first, second, " two  spaces\n\nAssistant: A cat."], ["Describe the image."]]]
    for prompt in prompts:
        for options in ({}, {"add_end_of_utterance_token": True}, {"add_eos_token": True}, {"padding_side": "right"}):
            _assert_same_features(ours(text=prompt, **options), reference(text=prompt, **options))
    ids = reference(text=prompts[1])["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == reference.batch_decode(ids, skip_special_tokens=skip)
    # vlmkit's chat template writes the model card's prompt: the same ids as the card's prompt list
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                             {"type": "image", "image": first}]}]
    card = ["User: What is in this image?", first, "<end_of_utterance>", "\nAssistant:"]
    got = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    _assert_same_features(got, reference(text=card, add_end_of_utterance_token=False))


def test_llava_onevision_processor_with_its_qwen2_tokenizer_matches_reference(llava_onevision_dir, tokenizer_files,
                                                                               tmp_path):
    from builders.llava_onevision import reference_processor
    from vlmkit.models.llava_onevision import LlavaOnevisionProcessor

    tokens = tokenizer_files["qwen2"]
    folder = with_tokenizer(llava_onevision_dir, tmp_path / "onevision", _onevision_config(tokens, padding_side="left"),
                            tokens)
    reference, ours = reference_processor(folder), LlavaOnevisionProcessor.from_pretrained(folder)
    assert type(reference.tokenizer).__name__ == "Qwen2Tokenizer"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?  Café 🙂\n"}]}]
    text = reference.apply_chat_template(messages, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == text
    images = [_image(40, 40, 0), _image(64, 20, 1)]
    _assert_same_features(ours(images=images, text=[text, text + " more"], padding=True, return_tensors="pt"),
                          reference(images=images, text=[text, text + " more"], padding=True, return_tensors="pt"))
    ids = reference(images=images[:1], text=[text], return_tensors="pt")["input_ids"]
    assert ours.batch_decode(ids, skip_special_tokens=True) == reference.batch_decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_janus_processor_with_llama_fast_class_over_byte_level_file_matches_reference(janus_dir, tmp_path,
                                                                                      add_bos_token):
    from vlmkit.models.janus import JanusProcessor

    config = json.loads((janus_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(tokenizer_class="LlamaTokenizerFast", legacy=True, add_bos_token=add_bos_token, add_eos_token=False,
                  use_default_system_prompt=True)
    folder = with_tokenizer(janus_dir, tmp_path / "janus", config)
    reference = transformers.AutoProcessor.from_pretrained(str(folder), backend="pil")
    ours = JanusProcessor.from_pretrained(folder)
    assert type(reference.tokenizer).__name__ == "TokenizersBackend"  # 5.23's fallback for a ByteLevel file
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe  it 🙂"}]}]
    text = reference.apply_chat_template(messages, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == text
    image = _image(40, 40, 0)
    _assert_same_features(ours(text=text, images=image, return_tensors="pt"),
                          reference(text=text, images=image, return_tensors="pt"))
