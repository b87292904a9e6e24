"""The transformers documentation's configuration examples run with only the import changed: each family's
config classes (and ``LlamaConfig`` / ``Qwen2Config`` for the text side) are built by keyword as transformers'
are, read back what transformers' read, and ``ModelClass(config)`` builds a randomly initialised model whose
checkpoint transformers loads to the same logits (and the other way round). Tiny sizes throughout: the
defaults are 7B-class models, whose configs are compared but never built."""

import json

import pytest
import torch
import transformers

import vlmkit
from vlmkit import InputError

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000)
JANUS_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                    projection_dim=64)
JANUS_VQ = dict(embed_dim=8, num_embeddings=64, base_channels=32, latent_channels=32, channel_multiplier=[1, 2],
                num_res_blocks=1, projection_dim=64, image_token_embed_dim=64)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14, vision_use_head=False)
IDEFICS_TEXT = {k: v for k, v in TEXT.items() if k != "num_key_value_heads"}  # IDEFICS' attention has none
IDEFICS_VISION = dict(embed_dim=32, image_size=28, patch_size=14, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2)
IDEFICS_PERCEIVER = dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8)


def _janus(lib):
    """The Janus doc's snippet, in ``lib`` (vlmkit or transformers), at tiny sizes."""
    vision_config = lib.JanusVisionConfig(**JANUS_VISION)
    vq_config = lib.JanusVQVAEConfig(**JANUS_VQ)
    text_config = lib.LlamaConfig(**TEXT)
    configuration = lib.JanusConfig(vision_config=vision_config, text_config=text_config, vq_config=vq_config)
    return configuration, lib.JanusForConditionalGeneration


def _llava_onevision(lib):
    vision_config = lib.SiglipVisionConfig(**SIGLIP)
    text_config = lib.Qwen2Config(**TEXT)
    configuration = lib.LlavaOnevisionConfig(vision_config=vision_config, text_config=text_config)
    return configuration, lib.LlavaOnevisionForConditionalGeneration


def _idefics(lib):
    configuration = lib.IdeficsConfig(**IDEFICS_TEXT, vision_config=IDEFICS_VISION, use_resampler=True,
                                      perceiver_config=IDEFICS_PERCEIVER, cross_layer_interval=1)
    return configuration, lib.IdeficsModel


FAMILIES = {"janus": _janus, "llava_onevision": _llava_onevision, "idefics": _idefics}
SECTIONS = {"janus": ("text_config", "vision_config", "vq_config"), "llava_onevision": ("text_config", "vision_config"),
            "idefics": ("vision_config", "perceiver_config")}


def _assert_same_config(ours, theirs, where):
    """Every key both ``to_dict``s have is equal (sections compared key by key), and every field vlmkit reads
    equals transformers' attribute of that name (the defaults of the keys left out included)."""
    ours_dict, theirs_dict = ours.to_dict(), theirs.to_dict()
    for key in ours_dict.keys() & theirs_dict.keys():
        if isinstance(ours_dict[key], dict) and hasattr(getattr(theirs, key, None), "to_dict"):
            _assert_same_config(getattr(ours, key), getattr(theirs, key), f"{where}.{key}")
            continue
        expected = theirs_dict[key]
        assert ours_dict[key] == (list(expected) if isinstance(expected, tuple) else expected), \
            f"{where}.{key}: vlmkit {ours_dict[key]!r}, transformers {expected!r}"
    for name in ours.__dataclass_fields__:
        if name != "extra" and hasattr(theirs, name) and not hasattr(getattr(theirs, name), "to_dict"):
            expected = getattr(theirs, name)
            assert getattr(ours, name) == (list(expected) if isinstance(expected, tuple) else expected), \
                f"{where}.{name}: vlmkit {getattr(ours, name)!r}, transformers {expected!r}"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_docs_config_snippet_builds_the_config_transformers_builds(family):
    ours, _ = FAMILIES[family](vlmkit)
    theirs, _ = FAMILIES[family](transformers)
    _assert_same_config(ours, theirs, family)
    assert ours.text_config.hidden_size == TEXT["hidden_size"]  # read by transformers' names
    assert ours.vision_config.num_hidden_layers == 1


@pytest.mark.parametrize("cls", ["JanusConfig", "LlavaOnevisionConfig", "IdeficsConfig", "LlamaConfig", "Qwen2Config",
                                 "JanusVisionConfig", "JanusVQVAEConfig", "SiglipVisionConfig", "IdeficsVisionConfig",
                                 "IdeficsPerceiverConfig"])
def test_a_config_built_without_arguments_has_transformers_defaults(cls):
    reference = getattr(transformers, cls, None) or getattr(transformers.models.idefics.configuration_idefics, cls)
    _assert_same_config(getattr(vlmkit, cls)(), reference(), cls)


@pytest.mark.parametrize("family", FAMILIES)
def test_sections_given_as_dicts_or_transformers_configs_read_as_the_config_objects(family):
    ours, _ = FAMILIES[family](vlmkit)
    theirs, _ = FAMILIES[family](transformers)
    cls = type(ours)
    flat = {k: v for k, v in ours.to_dict().items() if k not in (*SECTIONS[family], "text_config", "model_type")}
    for form in ("dict", "transformers"):
        sections = {key: getattr(ours, key).to_dict() if form == "dict" else getattr(theirs, key)
                    for key in SECTIONS[family]}
        again = cls(**flat, **sections) if family == "idefics" else cls(**sections)
        _assert_same_config(again, theirs, f"{family} ({form})")
        assert again.to_dict() == ours.to_dict() or form == "transformers"


def test_llava_onevision_config_takes_its_sections_positionally_as_the_doc_writes():
    vision_config, text_config = vlmkit.SiglipVisionConfig(**SIGLIP), vlmkit.Qwen2Config(**TEXT)
    configuration = vlmkit.LlavaOnevisionConfig(vision_config, text_config)
    assert configuration.vision_config is vision_config and configuration.text_config is text_config


def test_a_section_of_the_wrong_type_is_refused_naming_it():
    with pytest.raises(InputError, match=r"JanusConfig\(vision_config=...\)"):
        vlmkit.JanusConfig(vision_config="big")


def _inputs(family, generator):
    input_ids = torch.randint(0, TEXT["vocab_size"], (1, 9), generator=generator)
    if family != "idefics":
        return dict(input_ids=input_ids)
    return dict(input_ids=input_ids, pixel_values=torch.randn(1, 1, 3, 28, 28, generator=generator),
                image_attention_mask=torch.ones(1, 9, 1, dtype=torch.long))


def _output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _names_and_shapes(model):
    """What ``save_pretrained`` writes: tensor names and shapes, a tied LM head once."""
    seen, names = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            names[name] = tuple(tensor.shape)
    return names


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_built_from_the_config_loads_in_transformers_with_the_same_outputs(family, tmp_path):
    configuration, model_class = FAMILIES[family](vlmkit)
    model = model_class(configuration)
    assert model.config is configuration
    if family == "idefics":  # the gates start closed (zeros, as transformers'): open them to test cross-attention
        for layer in model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.data.fill_(0.5)
            layer.alpha_dense.data.fill_(0.5)
    model.save_pretrained(tmp_path)
    # a model with no checkpoint folder writes its own files only (no tokenizer copied from anywhere)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    reference_class = getattr(transformers, model_class.__name__)
    reference = reference_class.from_pretrained(tmp_path, dtype=torch.float32).eval()
    _, reference_built = FAMILIES[family](transformers)
    assert _names_and_shapes(model.eval()) == _names_and_shapes(reference_built(FAMILIES[family](transformers)[0]))
    inputs = _inputs(family, torch.Generator().manual_seed(0))
    torch.testing.assert_close(_output(model, inputs), _output(reference, inputs), rtol=1e-4, atol=1e-4)
    # and back: the saved config reads as the one the model was built from
    assert type(configuration).from_dict(json.loads((tmp_path / "config.json").read_text())).to_dict() == \
        {**configuration.to_dict(), "architectures": [model_class.__name__], "dtype": "float32"}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_transformers_model_built_from_the_same_config_loads_in_vlmkit_with_the_same_outputs(family, tmp_path):
    reference_config, reference_class = FAMILIES[family](transformers)
    torch.manual_seed(0)
    reference = reference_class(reference_config).eval()
    reference.save_pretrained(tmp_path)
    model = getattr(vlmkit, reference_class.__name__).from_pretrained(tmp_path, dtype=torch.float32)
    inputs = _inputs(family, torch.Generator().manual_seed(1))
    torch.testing.assert_close(_output(model, inputs), _output(reference, inputs), rtol=1e-4, atol=1e-4)
    ours, _ = FAMILIES[family](vlmkit)
    assert _names_and_shapes(model) == _names_and_shapes(type(model)(ours))


def test_llava_onevision_token_ids_by_keyword_take_transformers_5_names_too():
    for names in [dict(image_token_id=5, video_token_id=7), dict(image_token_index=5, video_token_index=7)]:
        expected = transformers.LlavaOnevisionConfig(**names)
        got = vlmkit.LlavaOnevisionConfig(**names)
        assert (got.image_token_id, got.video_token_id) == (expected.image_token_id, expected.video_token_id) == (5, 7)
