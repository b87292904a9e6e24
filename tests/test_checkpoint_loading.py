"""Finding and loading checkpoints: local folders, the HF cache, shards, dtypes, and clear errors."""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit import AutoModel, AutoProcessor, CheckpointError, JanusForConditionalGeneration
from vlmkit.io.mapped_safetensors import MappedSafetensors, release_pages
from vlmkit.io.memory import HUGE_PAGE, huge_pages_available, in_huge_pages, move_to_huge_pages
from vlmkit.quant.weight_only import quantize_int4, quantize_int8


def _reshard(folder, out, shards):
    shutil.copytree(folder, out)
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for index in range(shards):
        part = names[index::shards]
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(out / file))
        weight_map.update({n: file for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


def test_sharded_safetensors_load_the_same_weights(janus_dir, tmp_path):
    sharded = _reshard(janus_dir, tmp_path / "sharded", 3)
    a = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32)
    b = JanusForConditionalGeneration.from_pretrained(sharded, dtype=torch.float32)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_missing_shard_is_named(janus_dir, tmp_path):
    sharded = _reshard(janus_dir, tmp_path / "sharded", 2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        JanusForConditionalGeneration.from_pretrained(sharded)


def _with_edited_weights(folder, out, edit):
    """A copy of a one-file checkpoint whose tensors ``edit(state)`` changed in place."""
    shutil.copytree(folder, out)
    state = load_file(str(out / "model.safetensors"))
    edit(state)
    save_file(state, str(out / "model.safetensors"))
    return out


def test_missing_and_misshaped_tensors_are_named(janus_dir, tmp_path):
    def damage(state):
        state.pop("model.language_model.norm.weight")
        state["model.aligner.fc1.bias"] = torch.zeros(3)

    broken = _with_edited_weights(janus_dir, tmp_path / "broken", damage)
    with pytest.raises(CheckpointError) as error:
        JanusForConditionalGeneration.from_pretrained(broken)
    assert "model.language_model.norm.weight" in str(error.value)
    assert "model.aligner.fc1.bias" in str(error.value)


def _mapped_ranges(path):
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) > 5 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_weights_in_the_checkpoints_dtype_are_not_copied_at_load(janus_dir, tmp_path):
    folder = shutil.copytree(janus_dir, tmp_path / "copy")
    model = JanusForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    reference = load_file(str(folder / "model.safetensors"))
    ranges = _mapped_ranges((folder / "model.safetensors").resolve())
    embedding = model.model.language_model.embed_tokens.weight
    assert any(start <= embedding.data_ptr() < end for start, end in ranges)  # a view of the mapped file
    assert torch.equal(embedding, reference["model.language_model.embed_tokens.weight"])
    with torch.no_grad():
        embedding.add_(1)  # the mapping is private: the file keeps its bytes
    assert torch.equal(load_file(str(folder / "model.safetensors"))["model.language_model.embed_tokens.weight"],
                       reference["model.language_model.embed_tokens.weight"])


def _resident_kib_of_mapping_holding(address):
    inside = False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "Rss:":
            return int(fields[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not huge_pages_available(), reason="transparent huge pages unavailable")
def test_large_weights_move_to_huge_pages_and_free_their_file_pages(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Embedding(1024, 1024),  # 4 MiB each
                                torch.nn.Conv2d(512, 512, 2))
    file = (tmp_path / "model.safetensors").resolve()
    save_file(model.state_dict(), str(file))
    reference = load_file(str(file))
    mapped = MappedSafetensors(file)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data = mapped.get_tensor(name)
    old_linear = model[0].weight.data

    assert move_to_huge_pages(model) == 1  # the linear weight; the lookup table and the convolution stay
    weight, table, kernel = model[0].weight, model[1].weight, model[2].weight
    assert _resident_kib_of_mapping_holding(table.data_ptr()) < 1024  # the copied weight's file pages freed
    ranges = _mapped_ranges(file)
    assert in_huge_pages(weight) and weight.data_ptr() % HUGE_PAGE == 0
    assert not any(a <= weight.data_ptr() < b for a, b in ranges)
    assert all(any(a <= t.data_ptr() < b for a, b in ranges) and not in_huge_pages(t) for t in (table, kernel))
    assert torch.equal(weight, reference["0.weight"]) and torch.equal(table, reference["1.weight"])
    assert torch.equal(old_linear, reference["0.weight"])  # a released view reads the file again
    x = torch.randn(3, 1024)
    torch.testing.assert_close(model[0](x), torch.nn.functional.linear(x, reference["0.weight"], reference["0.bias"]),
                               rtol=0, atol=0)
    save_file({"weight": weight}, str(tmp_path / "again.safetensors"))  # a moved weight saves as usual
    assert torch.equal(load_file(str(tmp_path / "again.safetensors"))["weight"], reference["0.weight"])


@pytest.mark.skipif(not huge_pages_available(), reason="transparent huge pages unavailable")
def test_quantized_weights_are_written_straight_into_huge_pages():
    values, _ = quantize_int8(torch.randn(2048, 1024))
    assert in_huge_pages(values)
    packed, _, _ = quantize_int4(torch.randn(4096, 1024), 128)
    assert in_huge_pages(packed)


def test_releasing_pages_leaves_tensors_outside_mapped_files_alone():
    tensor = torch.arange(4 << 20, dtype=torch.float32)
    assert not release_pages(tensor)
    assert torch.equal(tensor, torch.arange(4 << 20, dtype=torch.float32))


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "offsets past the end"])
def test_damaged_safetensors_files_are_named(janus_dir, tmp_path, damage):
    folder = shutil.copytree(janus_dir, tmp_path / "damaged")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    if damage == "truncated":
        data = data[:header_length + 8 + 100]
    elif damage == "garbage header":
        data = data[:8] + b"\xff" * header_length + data[8 + header_length:]
    else:
        data = data[:8 + header_length + 16]
    file.write_bytes(data)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        JanusForConditionalGeneration.from_pretrained(folder)


def test_dtype_auto_follows_the_config_and_explicit_dtypes_apply(janus_dir):
    assert JanusForConditionalGeneration.from_pretrained(janus_dir).dtype == torch.float32
    model = JanusForConditionalGeneration.from_pretrained(janus_dir, torch_dtype=torch.float16)
    assert model.dtype == torch.float16
    assert model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32


def test_hub_id_resolves_through_the_local_cache_and_names_the_path_when_absent(janus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="models--deepseek-community--Janus-Pro-1B"):
        AutoModel.from_pretrained("deepseek-community/Janus-Pro-1B")
    repo = tmp_path / "hub" / "models--deepseek-community--Janus-Pro-1B"
    shutil.copytree(janus_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    model = AutoModel.from_pretrained("deepseek-community/Janus-Pro-1B", dtype="float32")
    processor = AutoProcessor.from_pretrained("deepseek-community/Janus-Pro-1B")
    assert isinstance(model, JanusForConditionalGeneration)
    assert processor.num_image_tokens == model.num_image_tokens


def test_unknown_model_type_is_refused(janus_dir, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(janus_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "blip_2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown model type 'blip_2'"):
        AutoModel.from_pretrained(folder)


def test_pickled_bin_with_code_is_refused_by_the_weights_only_loader(janus_dir, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(janus_dir / "config.json", folder / "config.json")
    torch.save({"weight": torch.zeros(1), "payload": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        JanusForConditionalGeneration.from_pretrained(folder)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_understanding_only_checkpoint_loads_and_refuses_image_generation(janus_dir, tmp_path):
    from vlmkit import InputError
    folder = tmp_path / "understanding_only"
    shutil.copytree(janus_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith(("model.vqmodel.", "model.generation_"))}
    save_file(state, str(folder / "model.safetensors"))
    model = JanusForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    prompt = processor.apply_chat_template([{"role": "user", "content": "A cat."}], add_generation_prompt=True)
    with pytest.raises(InputError, match="no image-generation weights"):
        model.generate(**processor(text=prompt, generation_mode="image"), generation_mode="image")
    text = model.generate(**processor(text=prompt), max_new_tokens=3)
    assert text.shape[1] == processor(text=prompt)["input_ids"].shape[1] + 3


def _edited_copy(folder, out, edit):
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


_TIE_FLAGS = {
    "top level": lambda c: c.update(tie_word_embeddings=True),
    "text config": lambda c: c.get("text_config", c).update(tie_word_embeddings=True),
    "absent": lambda c: c.pop("tie_word_embeddings", None),
}


@pytest.mark.parametrize("family", ["janus", "llava_onevision", "idefics"])
@pytest.mark.parametrize("flag", list(_TIE_FLAGS))
def test_a_saved_lm_head_is_used_whatever_the_tie_flags_say(family, flag, request, tmp_path):
    """transformers 5 replaces no head the checkpoint holds: a tie flag only fills a missing one."""
    import transformers

    source = request.getfixturevalue({"janus": "janus_dir", "llava_onevision": "llava_onevision_dir",
                                      "idefics": "idefics_plain_dir"}[family])
    folder = _edited_copy(source, tmp_path / "tie", _TIE_FLAGS[flag])
    classes = {"janus": "JanusForConditionalGeneration", "llava_onevision": "LlavaOnevisionForConditionalGeneration",
               "idefics": "IdeficsForVisionText2Text"}
    reference = getattr(transformers, classes[family]).from_pretrained(folder, dtype=torch.float32)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    saved = reference.lm_head.weight
    assert saved.data_ptr() != reference.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight, saved)
    assert model.lm_head.weight is not model.text_model.embed_tokens.weight


@pytest.mark.parametrize("family", ["janus", "llava_onevision"])
def test_a_missing_lm_head_is_the_input_embedding(family, request, tmp_path):
    import transformers

    source = request.getfixturevalue({"janus": "janus_dir", "llava_onevision": "llava_onevision_dir"}[family])
    folder = _edited_copy(source, tmp_path / "no_head", _TIE_FLAGS["top level"])
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "lm_head" not in k}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    classes = {"janus": "JanusForConditionalGeneration", "llava_onevision": "LlavaOnevisionForConditionalGeneration"}
    reference = getattr(transformers, classes[family]).from_pretrained(folder, dtype=torch.float32)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(reference.lm_head.weight, reference.get_input_embeddings().weight)
    assert model.lm_head.weight is model.text_model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def _restored(folder, out, dtypes, config_dtype=None, text_dtype=None):
    """A copy of ``folder`` whose tensors are stored in ``dtypes(name)`` and whose config.json names
    ``config_dtype`` at the top level (key ``torch_dtype``, as older files do) and ``text_dtype`` in text_config."""
    def edit(config):
        config.pop("dtype", None)
        config.pop("torch_dtype", None)
        config["text_config"].pop("dtype", None)
        if config_dtype:
            config["torch_dtype"] = config_dtype
        if text_dtype:
            config["text_config"]["dtype"] = text_dtype
    folder = _edited_copy(folder, out, edit)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v.to(dtypes(k)) if v.is_floating_point() else v for k, v in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


_STORAGE = {
    "bf16 weights": dict(dtypes=lambda name: torch.bfloat16),
    "fp16 weights": dict(dtypes=lambda name: torch.float16),
    # transformers reads the first floating tensor in name order and loads everything in its dtype
    "mixed, fp16 first": dict(dtypes=lambda name: torch.float16 if name.startswith("lm_head") else torch.bfloat16),
    "mixed, bf16 first": dict(dtypes=lambda name: torch.float16 if name.startswith("model.vision") else torch.bfloat16),
    "text config's dtype only": dict(dtypes=lambda name: torch.bfloat16, text_dtype="float16"),
    "torch_dtype key": dict(dtypes=lambda name: torch.float32, config_dtype="float16"),
}


@pytest.mark.parametrize("storage", list(_STORAGE))
@pytest.mark.parametrize("argument", [{}, {"dtype": "auto"}, {"torch_dtype": "auto"}])
def test_dtype_auto_and_no_dtype_follow_the_stored_weights_when_the_config_names_none(janus_dir, tmp_path,
                                                                                       storage, argument):
    import transformers

    folder = _restored(janus_dir, tmp_path / "stored", **_STORAGE[storage])
    reference = transformers.JanusForConditionalGeneration.from_pretrained(folder, **argument)
    model = JanusForConditionalGeneration.from_pretrained(folder, **argument)
    assert model.dtype == reference.dtype
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {reference.dtype}
    assert reference.lm_head.weight.dtype == reference.dtype


@pytest.mark.parametrize("index_dtype", [None, "float32"])
def test_dtype_auto_of_a_sharded_checkpoint_reads_its_index_or_first_shard(janus_dir, tmp_path, index_dtype):
    import transformers

    folder = _restored(janus_dir, tmp_path / "stored", dtypes=lambda name: torch.bfloat16)
    sharded = _reshard(folder, tmp_path / "sharded", 2)
    first = load_file(str(sharded / "model-00001-of-00002.safetensors"))
    save_file({k: v.half() for k, v in first.items()}, str(sharded / "model-00001-of-00002.safetensors"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["metadata"] = {"total_size": 0, **({"dtype": index_dtype} if index_dtype else {})}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    reference = transformers.JanusForConditionalGeneration.from_pretrained(sharded)
    assert reference.dtype == (torch.float32 if index_dtype else torch.float16)
    assert JanusForConditionalGeneration.from_pretrained(sharded).dtype == reference.dtype


def test_from_pretrained_takes_transformers_location_and_hub_options(janus_dir, tmp_path, monkeypatch):
    # cache_dir names the hub cache (as in transformers), subfolder a folder inside the snapshot; options about
    # downloading change nothing where nothing is downloaded; neutral values of loading options are accepted
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    repo = tmp_path / "my_cache" / "models--org--tiny-janus"
    shutil.copytree(janus_dir, repo / "snapshots" / "abc123" / "weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    where = dict(cache_dir=str(tmp_path / "my_cache"), subfolder="weights", token=None, local_files_only=True,
                 force_download=False)
    model, info = AutoModel.from_pretrained("org/tiny-janus", dtype="float32", use_safetensors=True, variant=None,
                                            low_cpu_mem_usage=True, output_loading_info=True, **where)
    assert isinstance(model, JanusForConditionalGeneration) and info["missing_keys"] == info["unexpected_keys"] == []
    processor = AutoProcessor.from_pretrained("org/tiny-janus", **where)
    assert processor.num_image_tokens == model.num_image_tokens
    with pytest.raises(CheckpointError, match="never downloads"):
        AutoModel.from_pretrained("org/tiny-janus", **{**where, "force_download": True})
    with pytest.raises(Exception, match="ignore_mismatched_sizes=True"):
        AutoModel.from_pretrained(janus_dir, ignore_mismatched_sizes=True)
    with pytest.raises(CheckpointError, match="no subfolder"):
        AutoModel.from_pretrained(janus_dir, subfolder="nowhere")


def test_save_pretrained_shards_replaces_a_previous_save_and_keeps_generation_edits(janus_dir, tmp_path):
    import transformers

    model = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    out = tmp_path / "saved"
    model.save_pretrained(out, max_shard_size="200KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    reference = transformers.JanusForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():  # transformers reads the shards as vlmkit wrote them
        assert torch.allclose(reference(input_ids=ids).logits, logits, atol=1e-5)
    # saved again into the same folder, unsharded and with other weights: the old shards and index are gone
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.generation_config.max_new_tokens = 17
    model.save_pretrained(out)
    assert not list(out.glob("model-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    again = JanusForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, 2 * logits, atol=1e-4)
    assert again.generation_config.max_new_tokens == 17
    for option in (dict(push_to_hub=True), dict(max_shard_size="lots")):
        with pytest.raises(Exception, match=next(iter(option))):
            model.save_pretrained(tmp_path / "refused", **option)
    model.save_pretrained(tmp_path / "unsafe", safe_serialization=False)  # transformers 5 writes safetensors too
    assert (tmp_path / "unsafe" / "model.safetensors").is_file() and not list((tmp_path / "unsafe").glob("*.bin"))


def test_an_index_whose_metadata_is_not_an_object_is_refused_naming_it(janus_dir, tmp_path):
    sharded = _reshard(janus_dir, tmp_path / "sharded", 2)
    config = json.loads((sharded / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)  # so that dtype "auto" reads the index
    (sharded / "config.json").write_text(json.dumps(config))
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "metadata": ["float32"]}))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: metadata must be a JSON object"):
        JanusForConditionalGeneration.from_pretrained(sharded)


def _point_shard(sharded, shard):
    """The index of ``sharded`` with its second shard's tensors listed under ``shard`` instead."""
    index = sharded / "model.safetensors.index.json"
    values = json.loads(index.read_text())
    values["weight_map"] = {k: shard if v.startswith("model-00002") else v for k, v in values["weight_map"].items()}
    index.write_text(json.dumps(values))


@pytest.mark.parametrize("shard,message", [("../outside.safetensors", "outside the checkpoint folder"),
                                           ("absolute", "outside the checkpoint folder"),
                                           ("model-00002.bin", "may only name .safetensors")])
def test_an_index_naming_shards_outside_the_folder_or_pickles_is_refused(janus_dir, tmp_path, shard, message):
    sharded = _reshard(janus_dir, tmp_path / "sharded", 2)
    second = load_file(str(sharded / "model-00002-of-00002.safetensors"))
    target = tmp_path / "elsewhere.bin" if shard == "absolute" else sharded / shard
    if target.suffix == ".bin":
        torch.save(second, str(target))
    else:
        save_file(second, str(target))
    _point_shard(sharded, str(target) if shard == "absolute" else shard)
    with pytest.raises(CheckpointError, match=message):
        JanusForConditionalGeneration.from_pretrained(sharded)


def test_a_janus_checkpoint_missing_some_generation_tensors_is_refused_naming_them(janus_dir, tmp_path):
    broken = _with_edited_weights(janus_dir, tmp_path / "broken",
                                  lambda state: state.pop("model.vqmodel.decoder.mid.attn_1.k.weight"))
    with pytest.raises(CheckpointError, match="lacks 1: model.vqmodel.decoder.mid.attn_1.k.weight"):
        JanusForConditionalGeneration.from_pretrained(broken)
    # without any generation tensor it is an understanding-only checkpoint
    def without_generation(state):
        for name in [k for k in state if k.startswith(("model.vqmodel.", "model.generation_"))]:
            del state[name]

    bare = _with_edited_weights(janus_dir, tmp_path / "bare", without_generation)
    assert not JanusForConditionalGeneration.from_pretrained(bare).has_generation_weights


def test_load_reads_the_processor_from_the_revision_and_cache_the_model_comes_from(janus_dir, tmp_path):
    import vlmkit
    repo = tmp_path / "hub" / "models--org--tiny-janus"
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(janus_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    # only the asked revision's processor has this setting
    processor_config = repo / "snapshots" / ("a" * 40) / "processor_config.json"
    values = json.loads(processor_config.read_text()) if processor_config.is_file() else {}
    processor_config.write_text(json.dumps({**values, "num_image_tokens": 4}))
    model, processor = vlmkit.load("org/tiny-janus", revision="a" * 40, cache_dir=tmp_path / "hub")
    assert model.folder == repo / "snapshots" / ("a" * 40)
    assert processor.num_image_tokens == 4
