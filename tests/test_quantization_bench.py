"""The quantized benchmark (vlmkit.bench.quantized) runs end to end on the tiny Janus and reports every
variant (nothing timed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_quantize_option_picks_the_variants():
    from vlmkit.bench.quantized import variants_for
    llama_cpp = ["llama.cpp bf16", "llama.cpp q8_0"]  # last, skipped where no build is found
    assert variants_for(None) == ["transformers bf16", "vlmkit bf16", "vlmkit int8", "vlmkit int4", *llama_cpp]
    assert variants_for("int4,bnb") == ["transformers bf16", "vlmkit bf16", "vlmkit int4", "transformers bnb nf4",
                                        "vlmkit bnb nf4", *llama_cpp]
    with pytest.raises(ValueError, match="--quantize 'int3'"):
        variants_for("int3")


def test_tiny_quantized_benchmark_reports_decode_and_image_step_times_and_peak_memory(tmp_path):
    out = tmp_path / "quantized.json"
    result = subprocess.run(
        [sys.executable, "-m", "vlmkit.bench.quantized", "--size", "tiny", "--variants", "vlmkit bf16,vlmkit int4",
         "--repeats", "1", "--decode-tokens", "2", "--image-steps", "3", "--cache-dir", str(tmp_path / "checkpoints"), "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    cpu = report["settings"]["cpu"]
    assert report["settings"]["kernels"] == cpu["kernels"]
    assert result.stdout.splitlines()[0].startswith(f"CPU: {cpu['model']} ({cpu['cores']} cores), {cpu['class']} [")
    rows = report["variants"]
    assert list(rows) == ["vlmkit bf16", "vlmkit int4"]
    for row in rows.values():
        assert row["decode_ms_per_step"] > 0 and row["peak_rss_mb"] > 0 and row["load_s"] > 0
        assert row["decode_vs_vlmkit_bf16"] > 0 and row["peak_rss_vs_vlmkit_bf16"] > 0
        # text-to-image: a CFG step's median time, and its cost against the variant's own decode step
        assert row["image_step_ms"] > 0 and len(row["image_step_samples_ms"]) == 1
        assert row["image_step_vs_decode_step"] == row["image_step_ms"] / row["decode_ms_per_step"]
    assert "| vlmkit int4 |" in result.stdout and "image step ms (CFG, 2 rows)" in result.stdout
    # the share of vlmkit's bf16 step comes from rounds alternating in one process, not from the children
    assert rows["vlmkit bf16"]["decode_vs_vlmkit_bf16"] == 1.0
    assert rows["vlmkit int4"]["decode_alternating_ms"] > 0
    assert rows["vlmkit int4"]["decode_vs_vlmkit_bf16"] == \
        rows["vlmkit int4"]["decode_alternating_ms"] / rows["vlmkit bf16"]["decode_alternating_ms"]


def test_llama_cpp_rows_are_skipped_cleanly_without_a_build(tmp_path, monkeypatch):
    from argparse import Namespace

    from vlmkit.bench.llama_cpp import llama_cpp_rows
    monkeypatch.delenv("VLMKIT_LLAMA_CPP", raising=False)
    logged = []
    args = Namespace(cache_dir=str(tmp_path), llama_cpp=None, build_llama_cpp=False, threads=1, repeats=1,
                     decode_tokens=2)
    assert llama_cpp_rows(tmp_path / "checkpoint", args, logged.append) == {}
    assert "rows are skipped" in logged[-1]
    args.llama_cpp = str(tmp_path)  # named, but no llama-bench built there: an error that says so
    with pytest.raises(FileNotFoundError, match="llama-bench"):
        llama_cpp_rows(tmp_path / "checkpoint", args, logged.append)


def test_llama_cpp_rows_time_the_same_tiny_checkpoint_where_a_build_is_found(tmp_path):
    from argparse import Namespace

    from vlmkit.bench.checkpoints import checkpoint
    from vlmkit.bench.llama_cpp import VARIANTS, find_tree, llama_cpp_rows
    tree = find_tree(None, Path.home() / ".cache" / "vlmkit-bench")
    if tree is None:
        pytest.skip("no llama.cpp build here (python -m vlmkit.bench.quantized --build-llama-cpp makes one)")
    args = Namespace(cache_dir=str(tmp_path), llama_cpp=str(tree), build_llama_cpp=False, threads=1, repeats=1,
                     decode_tokens=2)
    folder = checkpoint("janus", "tiny", tmp_path)
    rows = llama_cpp_rows(folder, args, lambda message: None)
    assert list(rows) == list(VARIANTS)
    for name, row in rows.items():
        assert row["decode_ms_per_step"] > 0 and row["peak_rss_mb"] > 0, name
        assert (tmp_path / "gguf" / f"{folder.name}-{VARIANTS[name]}.gguf").is_file()
