"""The vlmkit command refuses bad flag values the way argparse does (exit 2, one line naming the fix, no
traceback) before any model loads; --version and defaults in --help."""

import subprocess
import sys

import pytest
import torch

import vlmkit
from vlmkit.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a command gets as far as loading a model."""
    from vlmkit.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the bad argument was refused")

    monkeypatch.setattr(Engine, "load", refuse)
    monkeypatch.delenv("VLMKIT_MODEL", raising=False)


def usage_error(capsys, *argv) -> str:
    """The error line of a command that argparse refuses."""
    with pytest.raises(SystemExit) as stopped:
        main(list(argv))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv,message", [
    (["chat", "--dtype", "foo", "hi"], "argument --dtype: invalid choice: 'foo'"),
    (["chat", "--device", "foo", "hi"], "argument --device: unknown device 'foo'; use cpu, cuda or cuda:N"),
    (["chat", "--device", "meta", "hi"], "vlmkit does not run on 'meta'"),
    (["chat", "--seed", str(2**64), "hi"], "argument --seed: must be a whole number from"),
    (["chat", "--seed", str(-2**63 - 1), "hi"], "argument --seed: must be a whole number from"),
    (["chat", "--seed", "1.5", "hi"], "argument --seed: '1.5' is not a whole number"),
    (["chat", "--max-new-tokens", "0", "hi"], "argument --max-new-tokens: must be 1 or more"),
    (["chat", "--temperature", "-1", "hi"], "argument --temperature: must be 0 or more"),
    (["chat", "--temperature", "nan", "hi"], "argument --temperature: 'nan' is not a finite number"),
    (["chat", "--top-p", "1.5", "hi"], "argument --top-p: must be more than 0 and at most 1"),
    (["chat", "--top-k", "-1", "hi"], "argument --top-k: must be 0 or more"),
    (["chat", "--frames", "0", "hi"], "argument --frames: must be 1 or more"),
    (["chat", "--image", "/no/such/picture.png", "hi"], "argument --image: no such file: /no/such/picture.png"),
    (["chat", "--image", "/dev/zero", "hi"], "argument --image: /dev/zero is not a regular file"),
    (["chat", "--video", "/no/such/clip.mp4", "hi"], "argument --video: no such file: /no/such/clip.mp4"),
    (["chat", "--image", "", "hi"], "argument --image: the path is empty; give a file path or URL"),
    (["chat", "--video", "", "hi"], "argument --video: the path is empty"),
    (["chat", "--model", "", "hi"], "argument --model/-m: the model is empty; give a checkpoint folder"),
    (["chat", "-m", "  ", "hi"], "argument --model/-m: the model is empty"),
    (["imagine", "-m", "", "a red circle"], "argument --model/-m: the model is empty"),
    (["batch", "-m", "", "-i", "a", "-o", "b"], "argument --model/-m: the model is empty"),
    (["serve", "--media-root", ""], "argument --media-root: the path is empty; give a folder"),
    (["chat"], "give a question, or -i for an interactive session"),
    (["chat", "   "], "give a question, or -i for an interactive session"),
    (["imagine", "a red circle", "--batch-size", "-2"], "argument --batch-size: must be 1 or more, got -2"),
    (["imagine", "a red circle", "-n", "0"], "argument -n: must be 1 or more, got 0"),
    (["imagine", "a red circle", "-n", "-3"], "argument -n: must be 1 or more, got -3"),
    (["imagine", "a red circle", "--seed", "-" + "9" * 30], "argument --seed: must be a whole number from"),
    (["imagine", "   "], "argument prompt: the prompt is empty"),
    (["imagine", "a red circle", "--cfg", "1e308"], "argument --cfg: must be from 0 to 100, got 1e308"),
    (["imagine", "a red circle", "--cfg", "-1"], "argument --cfg: must be from 0 to 100"),
    (["imagine", "a red circle", "--name", "a/b"], "argument --name: 'a/b' is not a plain file name"),
    (["imagine", "a red circle", "--name", "../../escape"], "argument --name: '../../escape' is not a plain file"),
    (["imagine", "a red circle", "--name", ".."], "argument --name: '..' is not a plain file name"),
    (["imagine", "a red circle", "--name", ""], "argument --name: '' is not a plain file name"),
    (["imagine", "a \udcff circle"], "argument prompt: the text is not valid UTF-8 (byte or code 0xff at character 2)"),
    (["chat", "hi \udcff"], "argument prompt: the text is not valid UTF-8 (byte or code 0xff at character 3)"),
    (["serve", "--port", "70000"], "argument --port: must be a port from 1 to 65535"),
    (["serve", "--media-root", "/no/such/folder"], "argument --media-root: no such folder: /no/such/folder"),
    (["serve", "--media-root", __file__], "argument --media-root: " + __file__ + " is a file"),
    (["serve", "--allowed-hosts", "10.0.0.0/33"], "argument --allowed-hosts: '10.0.0.0/33' is not a valid IP"),
    (["serve", "--allowed-hosts", "ok.example,bad host"], "argument --allowed-hosts: 'bad host' is not a host name"),
    (["serve", "--api-key", ""], "argument --api-key: is empty"),
    (["batch", "-i", "a", "-o", "b", "--media-root", "/no/such/folder"], "argument --media-root: no such folder"),
    (["serve", "--dtype", "int3"], "argument --dtype: invalid choice"),
    (["train", "--out", "x", "--device", "foo"], "argument --device: unknown device 'foo'"),
    (["serve", "--max-images", "-1"], "argument --max-images: must be 1 or more, got -1"),
    (["serve", "--max-n", "x"], "argument --max-n: 'x' is not a whole number"),
    (["serve", "--fetch-timeout", "0"], "argument --fetch-timeout: must be above 0"),
    (["serve", "--header-timeout", "inf"], "argument --header-timeout: 'inf' is not a finite number"),
    (["batch", "--input", "a", "--output", "b", "--concurrency", "0"], "argument --concurrency: must be 1 or more"),
    (["batch", "--input", "a", "--output", "b", "--replicas", "-2"], "argument --replicas: must be 1 or more"),
])
def test_bad_flag_values_are_usage_errors_before_the_model_loads(capsys, no_model_load, argv, message):
    assert message in usage_error(capsys, *argv)


def test_cuda_without_a_cuda_device_is_a_usage_error(capsys, no_model_load, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = usage_error(capsys, "chat", "--device", "cuda", "hi")
    assert "argument --device: 'cuda' asked for, but torch sees no CUDA device here; use --device cpu" in line


def test_a_cuda_index_past_the_devices_is_a_usage_error(capsys, no_model_load, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "use cuda:0 to cuda:1" in usage_error(capsys, "imagine", "x", "--device", "cuda:5")


def test_good_values_parse(no_model_load):
    from vlmkit.cli import build_parser
    args = build_parser().parse_args(["chat", "--seed", str(2**64 - 1), "--device", "cpu", "--dtype", "bfloat16",
                                      "--image", "https://example.com/a.png", "hi"])
    assert args.seed == 2**64 - 1 and args.device == "cpu" and args.image == ["https://example.com/a.png"]
    assert build_parser().parse_args(["imagine", "x", "--seed", str(-2**63)]).seed == -2**63


def test_video_on_a_model_without_video_is_refused_before_it_loads(capsys, no_model_load, tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not read")
    line = usage_error(capsys, "chat", "--video", str(clip), "What happens?")
    assert "argument --video: janus models cannot take video; use a LLaVA-OneVision checkpoint" in line


def test_a_model_missing_from_the_cache_names_hf_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert main(["chat", "--model", "some-org/some-model", "hi"]) == 1
    err = capsys.readouterr().err
    assert "`hf download some-org/some-model`" in err and "huggingface-cli" not in err


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_version_names_the_cpu_class_and_kernels(setting, monkeypatch):
    from vlmkit.nn import cpu_features
    monkeypatch.setenv("VLMKIT_CPU_KERNELS", setting)
    result = subprocess.run([sys.executable, "-m", "vlmkit.cli", "--version"], capture_output=True, text=True,
                            timeout=60)
    cpu_features.kernel_isa.cache_clear()  # this process's answer for the same setting
    try:
        kernels = cpu_features.kernel_isa() or "portable"
    finally:
        monkeypatch.undo()
        cpu_features.kernel_isa.cache_clear()
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[0] == f"vlmkit {vlmkit.__version__}"
    assert lines[1] == f"torch {torch.__version__}"
    assert cpu_features.cpu_class() in lines[2]
    assert lines[2].endswith(f"kernels: {kernels} (VLMKIT_CPU_KERNELS={setting})")


@pytest.mark.parametrize("command,shown", [
    ("chat", ["(default: 256)", "(default: auto)", "(default: 8)"]),
    ("imagine", ["(default: 1)", "(default: .)", "(default: image)"]),
    ("serve", ["(default: 127.0.0.1)", "(default: 8000)"]),
])
def test_help_shows_the_defaults(capsys, command, shown):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in shown:
        assert default in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("name, message", [
    ("notes.png", "not a readable video: FFmpeg cannot decode a frame of it"),  # text named like an image
    ("still.png", "this is a still image, not a video (8 frames requested, it has 1); give it as an image"),
    ("short.mp4", "8 frames requested but the video has only 3"),
])
def test_a_video_that_cannot_give_the_frames_is_refused_before_the_model_loads(
        capsys, no_model_load, llava_onevision_dir, tmp_path, name, message):
    from fixtures_llava import write_video
    from PIL import Image
    (tmp_path / "notes.png").write_text("hello, not a png\n")
    Image.new("RGB", (16, 16), "red").save(tmp_path / "still.png")
    write_video(tmp_path / "short.mp4", num_frames=3)
    assert main(["chat", "--model", str(llava_onevision_dir), "--video", str(tmp_path / name), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vlmkit: error: ") and message in err and "Traceback" not in err, err


def test_llama_cpp_flags_without_quantize_or_a_build_are_named(tmp_path):
    from vlmkit.bench.options import llama_cpp_problem
    from vlmkit.bench.run import parse_args

    assert "--llama-cpp only apply with --quantize" in llama_cpp_problem(parse_args(["--llama-cpp", str(tmp_path)]))
    assert "--build-llama-cpp only apply with --quantize" in llama_cpp_problem(parse_args(["--build-llama-cpp"]))
    assert "no such folder" in llama_cpp_problem(parse_args(["--quantize", "int8", "--llama-cpp", "/nonexistent"]))
    problem = llama_cpp_problem(parse_args(["--quantize", "int8", "--llama-cpp", str(tmp_path)]))
    assert "no build/bin/llama-bench and no convert_hf_to_gguf.py there" in problem
    (tmp_path / "build" / "bin").mkdir(parents=True)
    (tmp_path / "build" / "bin" / "llama-bench").write_text("")
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    assert llama_cpp_problem(parse_args(["--quantize", "int8", "--llama-cpp", str(tmp_path)])) is None
    assert llama_cpp_problem(parse_args(["--quantize", "int8"])) is None


def test_bench_refuses_llama_cpp_flags_it_would_ignore_before_measuring(capsys):
    from vlmkit.cli import main

    assert main(["bench", "--llama-cpp", "/nonexistent"]) == 2
    assert "only apply with --quantize" in capsys.readouterr().err


def test_help_and_a_bad_option_are_answered_without_loading_torch():
    """torch takes seconds to import: ``vlmkit --help`` and argparse's own errors answer before it loads (and a
    Ctrl-C while it loads ends the command like one at any other time)."""
    script = ("import sys, contextlib, io\n"
              "from vlmkit.cli import main\n"
              "for argv in (['--help'], ['ask', '--max-new-tokens', 'many']):\n"
              "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()), "
              "contextlib.redirect_stderr(io.StringIO()):\n"
              "        main(argv)\n"
              "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
