"""The model API beside generate, against transformers on the three families' tiny checkpoints (fp32):
forward's transformers options (a hand-written decoding loop on ``past_key_values``, hidden states,
``return_dict=False``, ``logits_to_keep``, the loss), the output's fields by name and position, and the
methods transformers code calls on a model."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlmkit.errors import InputError

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

FAMILIES = ["janus", "llava_onevision", "idefics", "idefics_plain"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (conftest.py)


def _janus(request, images):
    from janus_reference import chat_inputs, ours, reference

    path = str(request.getfixturevalue("janus_dir"))
    (ref_processor, ref_model), (_, model) = reference(path), ours(path)
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": question}]}]
                     for image, question in [(images["square"], "What do you see in this image?"),
                                             (images["wide"], "Describe it.")]]
    return ref_model, model, chat_inputs(ref_processor, conversations, padding=True)


def _llava_onevision(request, images):
    ref_processor, ref_model = request.getfixturevalue("onevision_reference")
    _, model = request.getfixturevalue("onevision_vlmkit")
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": question}]}]
                     for image, question in [(images["tall"], "What is shown in this image?"),
                                             (images["square"], "And here?")]]
    return ref_model, model, ref_processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        padding=True, padding_side="left")


def _idefics(request, images, fixture="idefics_resampler_dir"):
    from vlmkit import IdeficsForVisionText2Text

    path = str(request.getfixturevalue(fixture))
    ref_processor = transformers.AutoProcessor.from_pretrained(path, backend="pil")
    ref_model = transformers.IdeficsForVisionText2Text.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [["User:", images["square"], "What is in the image?\nAssistant:"],
               ["User:", images["wide"], "Describe it.\nAssistant:"]]
    return ref_model, IdeficsForVisionText2Text.from_pretrained(path, dtype=torch.float32), ref_processor(text=prompts)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, sample_images):
    """(reference model, vlmkit model, a left-padded batch of two image prompts) of one family."""
    make = {"janus": _janus, "llava_onevision": _llava_onevision, "idefics": _idefics,
            "idefics_plain": lambda r, i: _idefics(r, i, "idefics_plain_dir")}[request.param]
    ref_model, model, inputs = make(request, sample_images)
    assert not bool(inputs["attention_mask"][:, 0].all())  # left padding in the batch
    return SimpleNamespace(name=request.param, ref_model=ref_model, model=model, inputs=dict(inputs))


def assert_close(got, want):
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=0), float((got - want).abs().max())


def greedy_loop(model, inputs, steps: int = 4):
    """The decoding loop of transformers tutorials: forward once, then feed each greedy token back with
    the returned ``past_key_values`` and the grown attention mask; (tokens, each step's last logits)."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        mask, tokens, logits = inputs["attention_mask"], [], [out.logits[:, -1]]
        extra = {}
        if "image_attention_mask" in inputs:  # IDEFICS: the images again, as transformers' generate passes them
            name = "perceiver_embeddings" if model.config.use_resampler else "image_encoder_embeddings"
            extra = {name: out.image_hidden_states, "image_attention_mask": inputs["image_attention_mask"][:, -1:]}
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, **extra)
            logits.append(out.logits[:, -1])
    return torch.cat(tokens, dim=1), logits


def test_a_hand_written_decoding_loop_on_past_key_values_matches_the_reference(family):
    want_tokens, want_logits = greedy_loop(family.ref_model, family.inputs)
    tokens, logits = greedy_loop(family.model, family.inputs)
    assert tokens.tolist() == want_tokens.tolist()
    for got, want in zip(logits, want_logits):
        assert_close(got, want)


def test_the_cache_grows_past_what_its_first_call_held(family):
    with torch.no_grad():
        out = family.model(**family.inputs)
        cache = out.past_key_values
        length = family.inputs["input_ids"].shape[1]
        assert cache.get_seq_length() == length and cache.max_len == length  # sized for the prompt alone
        greedy_loop(family.model, family.inputs, steps=3)  # each step grows it (doubling)


def test_hidden_states_are_the_references(family):
    with torch.no_grad():
        want = family.ref_model(**family.inputs, output_hidden_states=True)
        got = family.model(**family.inputs, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states)
    for have, expected in zip(got.hidden_states, want.hidden_states):
        assert_close(have, expected)
    assert_close(got.image_hidden_states, want.image_hidden_states)


def test_output_fields_by_name_and_position_and_return_dict_false(family):
    labels = family.inputs["input_ids"].masked_fill(family.inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        want = family.ref_model(**family.inputs, return_dict=False)
        got = family.model(**family.inputs, return_dict=False)
        plain = family.model(**family.inputs, use_cache=False)
        with_labels = family.model(**family.inputs, labels=labels)
    assert isinstance(got, tuple) and len(got) == len(want)
    assert_close(got[0], want[0])
    assert list(plain) == ["logits", "image_hidden_states"]  # unset fields are neither keys nor positions
    assert plain.past_key_values is None and plain.loss is None and plain.hidden_states is None
    assert plain[0] is plain.logits and with_labels[0] is with_labels.loss
    if family.name != "idefics":  # transformers' IDEFICS loss fails with an additional vocabulary
        want_loss = family.ref_model(**family.inputs, labels=labels).loss
        assert torch.allclose(with_labels.loss, want_loss, atol=1e-5)


def test_logits_to_keep_and_cache_position_as_the_reference(family):
    positions = torch.tensor([0, 3, 7])
    length = family.inputs["input_ids"].shape[1]
    with torch.no_grad():
        for keep in (1, positions):
            assert_close(family.model(**family.inputs, logits_to_keep=keep).logits,
                         family.ref_model(**family.inputs, logits_to_keep=keep).logits)
        out = family.model(**family.inputs, cache_position=torch.arange(length))
        with pytest.raises(InputError, match="cache_position"):
            token = out.logits[:, -1:].argmax(-1)
            family.model(input_ids=token, past_key_values=out.past_key_values, cache_position=torch.tensor([3]))


def test_unsupported_forward_options_are_errors_naming_them(family):
    with pytest.raises(InputError, match="output_attentions"):
        family.model(**family.inputs, output_attentions=True)
    with pytest.raises(InputError, match="past_key_values"):
        family.model(**family.inputs, past_key_values=((torch.zeros(1),),))


def test_embedding_accessors_and_inputs_embeds_give_the_references_logits(family):
    model, ref_model = family.model, family.ref_model
    assert model.get_input_embeddings() is model.get_decoder().embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    assert model.can_generate() and model.main_input_name == ref_model.main_input_name
    ids = family.inputs["input_ids"][:1, -5:]  # text positions only
    extra = {}
    if "image_attention_mask" in family.inputs:  # transformers' IDEFICS needs an image input
        extra = dict(pixel_values=family.inputs["pixel_values"][:1],
                     image_attention_mask=torch.zeros(1, 5, family.inputs["pixel_values"].shape[1], dtype=torch.long))
    with torch.no_grad():
        want = ref_model(inputs_embeds=ref_model.get_input_embeddings()(ids), **extra).logits
        got = model(inputs_embeds=model.get_input_embeddings()(ids), **extra).logits
    assert_close(got, want)


def test_num_parameters_counts_as_the_reference(family):
    for options in (dict(), dict(exclude_embeddings=True)):
        assert family.model.num_parameters(**options) == family.ref_model.num_parameters(**options)


def test_state_dict_names_shapes_and_values_are_the_references(family):
    ours, want = family.model.state_dict(), family.ref_model.state_dict()
    assert sorted(ours) == sorted(want)
    for name, tensor in want.items():
        assert ours[name].shape == tensor.shape and torch.equal(ours[name], tensor), name


def test_load_state_dict_takes_the_references_weights(family):
    """Both models load the same changed weights (strictly, by transformers' names) and agree on logits."""
    torch.manual_seed(0)
    changed = {name: tensor + 0.02 * torch.randn_like(tensor) if tensor.is_floating_point() else tensor
               for name, tensor in family.ref_model.state_dict().items()}
    ref_model, model = copy.deepcopy(family.ref_model), copy.deepcopy(family.model)
    ref_model.load_state_dict(changed)
    model.load_state_dict(changed)
    with torch.no_grad():
        want, got = ref_model(**family.inputs).logits, model(**family.inputs).logits
        before = family.model(**family.inputs).logits
    assert not torch.allclose(got, before, atol=1e-3)  # the change reached the logits
    assert_close(got, want)


RESIZES = {"grow": dict(new_num_tokens=7), "shrink": dict(new_num_tokens=-5), "pad only": dict(pad_to_multiple_of=48),
           "grow and pad": dict(new_num_tokens=3, pad_to_multiple_of=16)}


@pytest.mark.parametrize("mean_resizing", [True, False], ids=["mean", "normal"])
@pytest.mark.parametrize("resize", RESIZES, ids=list(RESIZES))
def test_resize_token_embeddings_gives_the_references_weights(family, resize, mean_resizing, tmp_path):
    """After the same seed both libraries hold the same weights (kept rows and drawn ones), vocab sizes and
    logits; the resized model saves and loads back (in vlmkit and in transformers)."""
    options = dict(RESIZES[resize], mean_resizing=mean_resizing)
    ref_model, model = copy.deepcopy(family.ref_model), copy.deepcopy(family.model)
    if "new_num_tokens" in options:
        options["new_num_tokens"] += model.get_input_embeddings().weight.shape[0]
    if family.name == "idefics":  # image tokens right after the regular vocabulary
        with pytest.raises(InputError, match="additional tokens .* a resize would move"):
            model.resize_token_embeddings(**options)
        return
    torch.manual_seed(0)
    want = ref_model.resize_token_embeddings(**options)
    torch.manual_seed(0)
    got = model.resize_token_embeddings(**options)
    assert got is model.get_input_embeddings() and got.weight.shape == want.weight.shape
    assert model.config.get_text_config().vocab_size == ref_model.config.get_text_config().vocab_size
    ours, theirs = model.state_dict(), ref_model.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs), \
        [name for name in theirs if not torch.equal(ours[name], theirs[name])]
    newest = dict(family.inputs, input_ids=family.inputs["input_ids"].clone())
    newest["input_ids"][:, -1] = got.weight.shape[0] - 1  # the last row, an added token where the vocabulary grew
    with torch.no_grad():
        assert_close(model(**family.inputs).logits, ref_model(**family.inputs).logits)
        assert_close(model(**newest).logits, ref_model(**newest).logits)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path, dtype=torch.float32)
    reference_again = type(ref_model).from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert_close(again(**family.inputs).logits, ref_model(**family.inputs).logits)
        assert_close(reference_again(**family.inputs).logits, ref_model(**family.inputs).logits)


def test_resize_token_embeddings_refuses_bad_sizes_and_changes_nothing_without_one(family):
    model = copy.deepcopy(family.model)
    embedding = model.get_input_embeddings()
    rows = embedding.weight.shape[0]
    assert model.resize_token_embeddings() is embedding and embedding.weight.shape[0] == rows
    for bad in (dict(new_num_tokens=0), dict(new_num_tokens=2.5), dict(pad_to_multiple_of=-8),
                dict(new_num_tokens=True)):
        with pytest.raises(InputError, match="must be a positive integer"):
            model.resize_token_embeddings(**bad)
    assert embedding.weight.shape[0] == rows


def test_resize_token_embeddings_of_a_quantized_head_says_to_resize_first(janus_dir):
    from vlmkit import JanusForConditionalGeneration

    model = JanusForConditionalGeneration.from_pretrained(janus_dir, quantization_config="int8")
    rows = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(InputError, match="unquantized: load the model without quantization_config, resize it"):
        model.resize_token_embeddings(rows + 8)
    assert model.get_input_embeddings().weight.shape[0] == rows


def test_memory_footprint_and_can_generate_as_the_reference(family):
    assert family.model.get_memory_footprint() == family.ref_model.get_memory_footprint(return_buffers=False) + \
        sum(b.nelement() * b.element_size() for b in family.model.buffers())
    assert family.model.get_memory_footprint(return_buffers=False) == \
        family.ref_model.get_memory_footprint(return_buffers=False)
    assert type(family.model).can_generate() and family.model.can_generate()


def test_gradient_checkpointing_gives_the_same_gradients_with_frozen_embeddings(family, monkeypatch):
    """Training as fine-tuning code sets it up: checkpointed layers and input grads for frozen embeddings."""
    import vlmkit.nn.decoder as decoder

    checkpointed_calls = []
    real_checkpoint = decoder.checkpoint
    monkeypatch.setattr(decoder, "checkpoint", lambda *a, **k: checkpointed_calls.append(1) or real_checkpoint(*a, **k))
    model = copy.deepcopy(family.model).train()
    model.get_input_embeddings().weight.requires_grad_(False)
    labels = family.inputs["input_ids"].masked_fill(family.inputs["attention_mask"] == 0, -100)

    def gradients():
        model.zero_grad()
        model(**family.inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    assert model.is_gradient_checkpointing
    assert not checkpointed_calls
    checkpointed = gradients()
    assert len(checkpointed_calls) == len(model.text_model.layers)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6)
    model.gradient_checkpointing_disable()
    model.disable_input_require_grads()
    with pytest.raises(InputError, match="use_reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_the_pad_tokens_embedding_row_trains_as_in_the_reference(family):
    """LLaMA and Qwen2 embeddings give the pad token's row no gradient (padding_idx)."""
    if family.name.startswith("idefics"):
        pytest.skip("IDEFICS' decoupled embedding uses no padding row in either library (and transformers' loss "
                    "fails on its additional vocabulary)")
    pad = family.ref_model.config.get_text_config().pad_token_id
    labels = family.inputs["input_ids"].masked_fill(family.inputs["attention_mask"] == 0, -100)
    assert bool((family.inputs["input_ids"] == pad).any())  # the left-padded batch holds pad tokens
    rows = []
    for model in (copy.deepcopy(family.model).train(), copy.deepcopy(family.ref_model).train()):
        model(**family.inputs, labels=labels).loss.backward()
        rows.append(model.get_input_embeddings().weight.grad[pad])
    torch.testing.assert_close(rows[0], rows[1], rtol=0, atol=0)
    assert not rows[0].any()


def test_tie_weights_ties_only_where_the_config_asks(llava_onevision_tied_dir, onevision_vlmkit):
    from vlmkit import LlavaOnevisionForConditionalGeneration

    untied = onevision_vlmkit[1]
    untied.tie_weights()
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight
    tied = LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_tied_dir, dtype=torch.float32)
    tied.lm_head.weight = torch.nn.Parameter(tied.lm_head.weight.detach().clone())
    tied.tie_weights()
    assert tied.lm_head.weight is tied.get_input_embeddings().weight


def test_janus_image_generation_reads_a_transformers_generation_config(janus_dir):
    from janus_reference import ours, reference

    ref_processor, ref_model = reference(str(janus_dir))
    _, model = ours(str(janus_dir))
    inputs = ref_processor(text="A red cat", generation_mode="image", return_tensors="pt")
    config = transformers.GenerationConfig(do_sample=False, guidance_scale=3.0)
    expected = ref_model.generate(**inputs, generation_mode="image", generation_config=config)
    got = model.generate(**inputs, generation_mode="image", generation_config=config)
    assert got.tolist() == expected.tolist()
    assert got.tolist() != model.generate(**inputs, generation_mode="image", do_sample=False).tolist()  # CFG 5


def test_generate_from_inputs_embeds_is_an_error_naming_it(family):
    embeds = family.model.get_input_embeddings()(family.inputs["input_ids"])
    with pytest.raises(InputError, match="inputs_embeds"):
        family.model.generate(inputs_embeds=embeds, attention_mask=family.inputs["attention_mask"], max_new_tokens=2)


def test_a_forward_with_gradients_keeps_its_cache_and_still_backpropagates(family):
    # eval mode with gradients on: transformers keeps a cache by default and the loss still backpropagates
    labels = family.inputs["input_ids"].masked_fill(family.inputs["attention_mask"] == 0, -100)
    out = family.model(**family.inputs, labels=labels)
    assert out.past_key_values is not None
    out.loss.backward()
    assert any(p.grad is not None for p in family.model.parameters())
    family.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert_close(family.model(**family.inputs, labels=labels).loss, out.loss.detach())


def test_config_names_its_family_and_text_settings_as_the_reference(family):
    config, want = family.model.config, family.ref_model.config
    assert config.model_type == want.model_type
    assert (config.architectures, config._name_or_path, config.dtype) == \
        (want.architectures, want._name_or_path, want.dtype)
    text, want_text = config.get_text_config(), want.get_text_config()
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "pad_token_id"):
        assert getattr(text, key) == getattr(want_text, key), key
    if family.name.startswith("idefics"):  # transformers' IdeficsConfig is flat: the text keys are its own
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "pad_token_id", "eos_token_id"):
            assert getattr(config, key) == getattr(want, key), key
        with pytest.raises(AttributeError):
            config.no_such_setting


def _same_where_both_have(got: dict, want: dict, path: str = "") -> int:
    """Asserts every key of ``got`` that ``want`` also has holds the same value; returns how many there were."""
    compared = 0
    for key, value in got.items():
        if key in want and isinstance(value, dict) and isinstance(want[key], dict):
            compared += _same_where_both_have(value, want[key], f"{path}{key}.")
        elif key in want:
            assert value == want[key], path + key
            compared += 1
    return compared


def test_config_to_dict_and_auto_config_say_what_the_references_say(family):
    from vlmkit import AutoConfig

    path = family.ref_model.config._name_or_path
    want = transformers.AutoConfig.from_pretrained(path).to_dict()
    for config in (family.model.config, AutoConfig.from_pretrained(path)):
        assert _same_where_both_have(config.to_dict(), want) > 20
        assert config.to_dict()["model_type"] == want["model_type"]
    assert AutoConfig.from_pretrained(path, tie_word_embeddings=True).tie_word_embeddings is True
    with pytest.raises(InputError, match="no_such_setting"):
        AutoConfig.from_pretrained(path, no_such_setting=1)


def test_config_edits_are_saved_with_the_model(family, tmp_path):
    """Fine-tuning code sets config values (special tokens, use_cache) and saves: transformers reads them back."""
    model = copy.deepcopy(family.model)
    model.config.get_text_config().eos_token_id = 5
    model.config.get_text_config().pad_token_id = 3
    model.config.use_cache = False
    model.save_pretrained(tmp_path)
    saved = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (saved.get_text_config().eos_token_id, saved.get_text_config().pad_token_id) == (5, 3)
    assert json.loads((tmp_path / "config.json").read_text())["use_cache"] is False
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.config.get_text_config().eos_token_id == 5
    # what was not edited is written as the checkpoint had it
    source = json.loads((Path(family.ref_model.config._name_or_path) / "config.json").read_text())
    written = json.loads((tmp_path / "config.json").read_text())
    assert set(source) - {"quantization_config"} <= set(written)
    edited = ("use_cache", "eos_token_id", "pad_token_id", "text_config", "dtype", "torch_dtype")
    assert {k: v for k, v in written.items() if k not in edited} == {k: v for k, v in source.items() if k not in edited}


def test_generation_config_update_to_dict_and_save_as_transformers(tmp_path):
    from vlmkit import GenerationConfig

    ours, theirs = GenerationConfig(max_new_tokens=5), transformers.GenerationConfig(max_new_tokens=5)
    assert ours.update(top_k=3, num_beams=2, not_an_option=1) == theirs.update(top_k=3, num_beams=2, not_an_option=1)
    assert (ours.top_k, ours.num_beams) == (theirs.top_k, theirs.num_beams) == (3, 2)
    assert {k: ours.to_dict()[k] for k in ("max_new_tokens", "top_k", "num_beams")} == \
        {k: theirs.to_dict()[k] for k in ("max_new_tokens", "top_k", "num_beams")}
    ours.save_pretrained(tmp_path)
    again = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (again.max_new_tokens, again.top_k, again.num_beams) == (5, 3, 2)
    with pytest.raises(InputError, match="num_beams"):  # checked as it is set, as generate would refuse it
        ours.update(num_beams=0)
    diff = json.loads(ours.to_json_string())
    assert {k: diff[k] for k in ("max_new_tokens", "top_k", "num_beams")} == \
        {k: theirs.to_diff_dict()[k] for k in ("max_new_tokens", "top_k", "num_beams")}
    assert ours.to_diff_dict() == diff and json.loads(ours.to_json_string(use_diff=False))["top_p"] == 1.0


@pytest.mark.parametrize("how", ["config", "keyword", "transformers_config"])
def test_from_pretrained_takes_an_edited_config_or_its_attributes_as_keywords(llava_onevision_dir, onevision_reference,
                                                                              how):
    """transformers' ``from_pretrained(path, config=edited)`` and ``from_pretrained(path, attribute=value)``:
    the weights load under the edited config and give the reference's logits under the same edit."""
    from vlmkit import AutoConfig, LlavaOnevisionForConditionalGeneration
    from test_llava_onevision import pattern_image

    processor, _ = onevision_reference
    edit = {"vision_feature_layer": -2}
    reference = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_dir, **edit).eval()
    if how == "config":
        config = AutoConfig.from_pretrained(llava_onevision_dir)
        config.vision_feature_layer = -2
        options = {"config": config}
    elif how == "transformers_config":
        options = {"config": reference.config}
    else:
        options = edit
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_dir, **options)
    assert model.config.vision_feature_layer == -2
    inputs = processor(images=pattern_image(40, 30), text="<image>Describe.", return_tensors="pt")
    with torch.no_grad():
        expected, got = reference(**inputs).logits, model(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        llava_onevision_dir).eval()(**inputs).logits, atol=1e-3)  # the edit changes the answer


def test_from_pretrained_refuses_a_config_of_another_kind_and_keeps_long_values_short(llava_onevision_dir):
    from vlmkit import LlavaOnevisionForConditionalGeneration

    with pytest.raises(InputError, match="config must be a LlavaOnevisionConfig"):
        LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_dir, config=3)
    with pytest.raises(InputError, match=r"no_such_option='xxx.*\.\.\.$"):
        LlavaOnevisionForConditionalGeneration.from_pretrained(llava_onevision_dir, no_such_option="x" * 500)


@pytest.mark.parametrize("args,kwargs", [(("cpu",), {"non_blocking": True}), ((torch.bfloat16,), {}),
                                         (("cpu", torch.float16), {}),
                                         ((), {"device": "cpu", "dtype": torch.bfloat16})])
def test_processor_outputs_move_and_cast_as_transformers_batch_features_do(onevision_reference, onevision_vlmkit, args,
                                                                           kwargs):
    from test_llava_onevision import pattern_image

    call = {"images": pattern_image(40, 30), "text": "<image>Describe.", "return_tensors": "pt"}
    expected = onevision_reference[0](**call).to(*args, **kwargs)
    got = onevision_vlmkit[0](**call).to(*args, **kwargs)
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in expected.items()}
    assert all(torch.equal(got[k], expected[k]) for k in expected)
