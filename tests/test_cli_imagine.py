"""vlmkit imagine on the built-in model: the output folder is checked and made before the model loads,
existing PNGs are never overwritten unless asked, and each batch is on disk before the next starts."""

import re

import pytest
from PIL import Image

from vlmkit.cli import main
from vlmkit.engine import Engine
from vlmkit.errors import CheckpointError


@pytest.fixture(autouse=True)
def builtin_model(monkeypatch):
    monkeypatch.delenv("VLMKIT_MODEL", raising=False)


def test_an_output_path_under_a_file_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Engine, "load", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "notes.txt").write_text("a file")
    for output, message in ((tmp_path / "notes.txt" / "out", "cannot create"), (tmp_path / "notes.txt", "is a file")):
        with pytest.raises(SystemExit) as stopped:
            main(["imagine", "a red circle", "-o", str(output)])
        assert stopped.value.code == 2
        assert "argument -o/--output: " in (err := capsys.readouterr().err) and message in err


def test_the_output_folder_exists_before_the_model_loads(tmp_path, monkeypatch):
    out = tmp_path / "new" / "folder"
    seen = []

    def load(*args, **kwargs):
        seen.append(out.is_dir())
        raise CheckpointError("stopped here")

    monkeypatch.setattr(Engine, "load", load)
    assert main(["imagine", "a red circle", "-o", str(out)]) == 1
    assert seen == [True]


def test_new_images_are_numbered_past_existing_ones_unless_overwrite(tmp_path, capsys):
    Image.new("RGB", (4, 4), "white").save(tmp_path / "image-00.png")
    before = (tmp_path / "image-00.png").read_bytes()
    assert main(["imagine", "a red circle", "-o", str(tmp_path), "-n", "2", "--seed", "3"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "image-01.png"), str(tmp_path / "image-02.png")]
    assert (tmp_path / "image-00.png").read_bytes() == before
    first = (tmp_path / "image-01.png").read_bytes()
    assert main(["imagine", "a red circle", "-o", str(tmp_path), "-n", "2", "--seed", "3", "--overwrite"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "image-00.png"), str(tmp_path / "image-01.png")]
    assert (tmp_path / "image-00.png").read_bytes() == first  # the same seed draws the same image again


def test_each_batch_is_written_before_the_next_one_starts(tmp_path, monkeypatch):
    on_disk, imagine = [], Engine.imagine

    def spy(self, prompt, n, **options):
        on_disk.append(sorted(path.name for path in tmp_path.glob("*.png")))
        return imagine(self, prompt, n, **options)

    monkeypatch.setattr(Engine, "imagine", spy)
    assert main(["imagine", "a red circle", "-o", str(tmp_path), "-n", "3", "--batch-size", "2", "--seed", "1"]) == 0
    assert on_disk == [[], ["image-00.png", "image-01.png"]]
    assert sorted(path.name for path in tmp_path.glob("*.png")) == ["image-00.png", "image-01.png", "image-02.png"]


def test_the_progress_bar_shows_how_many_rows_of_the_picture_are_drawn(tmp_path, capsys):
    assert main(["imagine", "a red circle", "-o", str(tmp_path), "--seed", "1"]) == 0
    rows = re.findall(r"row (\d+)/(\d+)", capsys.readouterr().err)
    assert rows and rows[-1][0] == rows[-1][1]  # the last update: every row drawn


def test_a_temperature_too_small_to_divide_by_draws_greedily_instead_of_failing(tmp_path, capsys):
    """--temperature 1e-38 (or a subnormal 1e-320) overflowed the logits to inf and sampling failed; below the
    server's GREEDY_BELOW the image tokens are the argmax, so every such run draws the same picture."""
    pictures = []
    for temperature in ("1e-38", "1e-320"):
        out = tmp_path / temperature
        assert main(["imagine", "a red circle", "-o", str(out), "--temperature", temperature, "--seed", "1"]) == 0
        pictures.append(Image.open(out / "image-00.png").tobytes())
    assert pictures[0] == pictures[1]


def test_a_model_that_cannot_draw_is_one_line_naming_it(tmp_path, capsys, llava_onevision_dir, idefics_plain_dir):
    for model in (llava_onevision_dir, idefics_plain_dir):
        assert main(["imagine", "a red circle", "-o", str(tmp_path), "--model", str(model)]) == 1
        error = capsys.readouterr().err
        assert "cannot generate images" in error and "Traceback" not in error
    assert not list(tmp_path.iterdir())


def test_a_png_that_cannot_be_written_is_an_error_leaving_no_partial_file(tmp_path, capsys, monkeypatch):
    def disk_full(image, path, *args, **kwargs):
        open(path, "wb").close()  # what a full disk leaves: the file begun, nothing in it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    assert main(["imagine", "a red circle", "-o", str(tmp_path), "--seed", "1"]) == 1
    assert "No space left on device" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_folder_in_the_way_of_a_picture_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Engine, "load", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "image-00.png").mkdir()
    assert main(["imagine", "a red circle", "-o", str(tmp_path), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "image-00.png: a folder of that name is in the way" in err and "Traceback" not in err


def test_a_png_that_cannot_be_overwritten_is_an_error_that_leaves_the_users_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "image-00.png").write_bytes(b"the user's picture")

    def refused(image, path, *args, **kwargs):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(Image.Image, "save", refused)
    assert main(["imagine", "a red circle", "-o", str(tmp_path), "--seed", "1", "--overwrite"]) == 1
    assert "Permission denied" in capsys.readouterr().err
    assert (tmp_path / "image-00.png").read_bytes() == b"the user's picture"
