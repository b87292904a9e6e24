"""``vlmkit convert`` on what users hand it: sharded ``.bin`` checkpoints convert shard for shard,
pickles that hold code or other objects are refused without running anything, and a destination
that holds files (or is the source) is never written into."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.cli import main
from vlmkit.errors import CheckpointError
from vlmkit.io.convert import convert_to_safetensors


class _RunsCode:
    """A pickle that would run a shell command on load (torch's weights-only loader must refuse it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bin_checkpoint(folder, shards: list[dict]):
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "janus"}')
    if len(shards) == 1:
        torch.save(shards[0], folder / "pytorch_model.bin")
        return folder
    weight_map = {}
    for index, shard in enumerate(shards):
        name = f"pytorch_model-{index + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / name)
        weight_map.update({key: name for key in shard})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_a_sharded_bin_checkpoint_converts_shard_for_shard_with_its_other_files(tmp_path):
    shards = [{"a": torch.arange(4.0)}, {"b": torch.ones(2, 3), "c": torch.zeros(1, dtype=torch.int64)}]
    source = _bin_checkpoint(tmp_path / "source", shards)
    written = convert_to_safetensors(source, tmp_path / "out")
    names = sorted(path.name for path in written)
    assert names == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in shards:
        for key, tensor in shard.items():
            assert torch.equal(load_file(str(tmp_path / "out" / index[key]))[key], tensor)


def test_a_pickle_that_holds_code_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    source = _bin_checkpoint(tmp_path / "source", [{"w": torch.ones(2), "payload": _RunsCode(marker)}])
    assert main(["convert", str(source), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "weights-only loader" in err and "GLOBAL" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ({"w": torch.ones(2), "step": 5}, "holds 'step', a int and not a tensor"),
    ({"state_dict": {"w": torch.ones(2)}}, "holds 'state_dict', a dict and not a tensor"),
])
def test_a_bin_of_other_things_than_tensors_is_refused_by_name(tmp_path, content, message):
    source = _bin_checkpoint(tmp_path / "source", [content])
    with pytest.raises(CheckpointError, match=message):
        convert_to_safetensors(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_damaged_shard_leaves_no_half_written_copy(tmp_path):
    source = _bin_checkpoint(tmp_path / "source", [{"a": torch.ones(2)}, {"b": torch.ones(2)}])
    (source / "pytorch_model-00002-of-00002.bin").write_bytes(b"truncated")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="cannot load .*00002-of-00002.bin"):
        convert_to_safetensors(source, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []  # the user's (empty) folder stays, emptied


def test_convert_never_writes_into_a_folder_with_files_or_onto_its_source(tmp_path, capsys):
    source = _bin_checkpoint(tmp_path / "source", [{"w": torch.ones(2)}])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "config.json").write_text("mine")
    assert main(["convert", str(source), str(tmp_path / "used")]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "used" / "config.json").read_text() == "mine"
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(CheckpointError, match="is a file"):
        convert_to_safetensors(source, tmp_path / "a_file")
    with pytest.raises(CheckpointError, match="different from the source"):
        convert_to_safetensors(source, source)


def test_a_folder_that_already_has_safetensors_or_no_weights_is_refused(tmp_path):
    source = _bin_checkpoint(tmp_path / "source", [{"w": torch.ones(2)}])
    convert_to_safetensors(source, tmp_path / "st")
    (source / "model.safetensors").write_bytes((tmp_path / "st" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="already holds safetensors weights .*nothing to convert"):
        convert_to_safetensors(source, tmp_path / "out")
    (tmp_path / "bare").mkdir()
    with pytest.raises(CheckpointError, match="no weights in"):
        convert_to_safetensors(tmp_path / "bare", tmp_path / "out")
    assert not (tmp_path / "out").exists()
