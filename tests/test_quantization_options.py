"""The loading options the transformers examples pass, and the command line: ``attn_implementation`` /
``use_flash_attention_2`` accepted as in transformers (one notice on a CPU, never a crash), and
``--quantize int8|int4`` on ``vlmkit chat`` / ``imagine`` / ``serve``, ``Engine.load(quantize=...)``."""

import subprocess
import sys
import warnings

import pytest
import torch
from quantization_support import forward_logits, image_prompt

from vlmkit import JanusForConditionalGeneration
from vlmkit.errors import InputError


@pytest.mark.parametrize("options", [dict(attn_implementation="flash_attention_2"),
                                     dict(use_flash_attention_2=True)])
def test_flash_attention_2_on_a_cpu_gives_one_notice_and_the_same_model(janus_dir, options):
    inputs = image_prompt("janus", str(janus_dir))
    with pytest.warns(UserWarning, match="flash_attention_2.*needs a CUDA GPU") as notices:
        model = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32, **options)
    assert len([n for n in notices if "flash_attention_2" in str(n.message)]) == 1
    assert model.attn_implementation == "flash_attention_2"
    plain = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32)
    assert torch.equal(forward_logits(model, inputs), forward_logits(plain, inputs))


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_sdpa_and_eager_are_accepted_quietly(janus_dir, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32, attn_implementation=name)
    assert model.attn_implementation == name


@pytest.mark.parametrize("name", ["flash_attention_2", "eager"])
def test_the_kernel_choice_for_cuda_wraps_every_attention_layer_and_computes_the_same(janus_dir, name):
    # no GPU here: the wrapping is applied as for CUDA and run on the CPU, where SDPA takes the same choice
    from vlmkit.nn.attention_choice import apply_attn_implementation
    inputs = image_prompt("janus", str(janus_dir))
    plain = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32)
    model = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float32 notice
        apply_attn_implementation(model, name, torch.device("cuda"), torch.float32)
    wrapped = [m for m in model.modules() if hasattr(type(m), "sdpa_backends")]
    assert len(wrapped) == 4  # 2 decoder layers, 2 vision layers
    assert torch.allclose(forward_logits(model, inputs), forward_logits(plain, inputs), atol=1e-5)


def test_an_unknown_attention_implementation_is_an_error(janus_dir):
    with pytest.raises(InputError, match="choose one of eager, sdpa, flash_attention_2"):
        JanusForConditionalGeneration.from_pretrained(janus_dir, attn_implementation="flash_attention_9")


def test_engine_loads_quantized(janus_dir):
    from vlmkit.engine import Engine
    from vlmkit.quant import quantized_modules
    engine = Engine.load(str(janus_dir), dtype="bfloat16", quantize="int4")
    assert "Int4Linear" in set(quantized_modules(engine.model).values())
    answer = engine.chat([{"role": "user", "content": [{"type": "text", "text": "hello"}]}], max_new_tokens=3)
    assert answer.completion_tokens == 3


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_chat_and_imagine_take_quantize(janus_dir, tmp_path, sample_images):
    from vlmkit.cli import build_parser, main
    sample_images["square"].save(tmp_path / "a.png")
    chat = run_cli("chat", "--model", str(janus_dir), "--quantize", "int8", "--image", str(tmp_path / "a.png"),
                   "What is this?", "--max-new-tokens", "4")
    assert chat.returncode == 0, chat.stderr
    assert main(["imagine", "--model", str(janus_dir), "--quantize", "int4", "a cat", "-o", str(tmp_path),
                 "--seed", "1"]) == 0
    assert (tmp_path / "image-00.png").is_file()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--quantize", "int3", "hi"])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_builtin_model_draws_with_quantized_weights_in_bfloat16(tmp_path, quantize):
    """In a child process, so a crash in a native op shows as a failed exit, not a dead test run."""
    result = run_cli("imagine", "a red circle", "--quantize", quantize, "--dtype", "bfloat16", "--seed", "0",
                     "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "image-00.png").is_file()


def test_serve_takes_quantize():
    from vlmkit.cli import build_parser
    from vlmkit.serve.config import config_from_args
    args = build_parser().parse_args(["serve", "--model", "m", "--quantize", "int4"])
    assert config_from_args(args).quantize == "int4"
