"""The vlmkit command on a tiny checkpoint: chat streams an answer, imagine writes PNGs."""

import subprocess
import sys

import pytest
from PIL import Image

from vlmkit.cli import main


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_chat_answers_about_an_image_with_the_greedy_reference_answer(janus_dir, tmp_path, sample_images):
    from janus_reference import chat_inputs, ours
    sample_images["square"].save(tmp_path / "a.png")
    result = run_cli("chat", "--model", str(janus_dir), "--image", str(tmp_path / "a.png"), "What is this?",
                     "--max-new-tokens", "10")
    assert result.returncode == 0, result.stderr
    processor, model = ours(str(janus_dir))
    messages = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "a.png")},
                                             {"type": "text", "text": "What is this?"}]}]
    inputs = chat_inputs(processor, messages)
    expected = processor.decode(model.generate(**inputs, max_new_tokens=10)[0, inputs["input_ids"].shape[1]:],
                                skip_special_tokens=True)
    assert result.stdout.rstrip("\n") == expected


def test_interactive_chat_keeps_the_conversation(janus_dir, tmp_path, sample_images):
    sample_images["wide"].save(tmp_path / "b.png")
    result = run_cli("chat", "--model", str(janus_dir), "-i", "--max-new-tokens", "4",
                     stdin=f"/image {tmp_path / 'b.png'}\nhello\nand again?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">>> ") >= 3


def test_imagine_writes_repeatable_pngs_of_the_model_size(janus_dir, tmp_path):
    for out in ("one", "two"):
        assert main(["imagine", "--model", str(janus_dir), "a red circle", "-n", "3", "-o", str(tmp_path / out),
                     "--seed", "5", "--batch-size", "2"]) == 0
    files = sorted((tmp_path / "one").glob("*.png"))
    assert len(files) == 3
    for file in files:
        image = Image.open(file)
        assert image.mode == "RGB" and image.size == (8, 8)  # 4x4 tokens, one 2x upsampling in the tiny VQ
        assert image.tobytes() == Image.open(tmp_path / "two" / file.name).tobytes()


def test_imagine_prints_paths_and_shows_progress(janus_dir, tmp_path):
    result = run_cli("imagine", "--model", str(janus_dir), "a dog", "-n", "2", "-o", str(tmp_path), "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.endswith(".png")] == \
        [str(tmp_path / "image-00.png"), str(tmp_path / "image-01.png")]
    assert "16/16" in result.stderr  # the progress bar over the image tokens


@pytest.mark.parametrize("args,message,code", [
    (["chat", "--model", "/nonexistent/model", "hi"], "does not exist", 1),
    (["imagine", "--model", "{janus}", "   "], "empty", 2),
])
def test_cli_errors_are_one_clear_line(janus_dir, args, message, code):
    result = run_cli(*[a.replace("{janus}", str(janus_dir)) for a in args])
    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr


def test_chat_with_an_idefics_checkpoint_puts_images_where_the_user_put_them(idefics_resampler_dir, tmp_path,
                                                                              sample_images):
    from vlmkit.engine import Engine
    sample_images["square"].save(tmp_path / "a.png")
    sample_images["tall"].save(tmp_path / "b.png")
    result = run_cli("chat", "--model", str(idefics_resampler_dir), "--image", str(tmp_path / "a.png"),
                     "--image", str(tmp_path / "b.png"), "Compare them.", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    engine = Engine.load(idefics_resampler_dir, dtype="float32")
    messages = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "a.png")},
                                             {"type": "image", "path": str(tmp_path / "b.png")},
                                             {"type": "text", "text": "Compare them."}]}]
    inputs = engine.prepare_chat(messages)
    assert inputs["pixel_values"].shape[1] == 2  # both images, in order
    assert result.stdout.rstrip("\n") == engine.chat(messages, max_new_tokens=6).text.lstrip()


def test_chat_about_a_video_with_a_llava_onevision_checkpoint(llava_onevision_dir, onevision_videos):
    from vlmkit.engine import Engine
    video = str(onevision_videos["clip"])
    result = run_cli("chat", "--model", str(llava_onevision_dir), "--video", video, "--frames", "4",
                     "What happens?", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    engine = Engine.load(llava_onevision_dir, dtype="float32")
    messages = [{"role": "user", "content": [{"type": "video", "path": video},
                                             {"type": "text", "text": "What happens?"}]}]
    assert result.stdout.rstrip("\n") == engine.chat(messages, max_new_tokens=6, num_frames=4).text.lstrip()
