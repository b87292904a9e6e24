"""The benchmark runs end to end on the tiny size and writes every figure (nothing here is timed)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_benchmark_writes_every_figure_for_janus(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--size", "tiny", "--family", "janus", "--repeats", "1",
         "--decode-tokens", "2", "--steps", "2", "--cache-dir", str(tmp_path / "checkpoints"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["memory_bandwidth_gb_s"] > 0
    assert {"dtype", "threads", "cpu", "torch", "transformers"} <= set(report["settings"])
    janus = report["families"]["janus"]
    assert janus["decode_weight_bytes"] > 0 and janus["bandwidth_bound_ms"] > 0
    metrics = janus["metrics"]
    assert set(metrics) == {"preprocess_ms_per_image", "first_token_s", "first_token_repeated_image_s",
                            "decode_ms_per_step_batch1", "decode_ms_per_step_batch4", "image_token_loop_s",
                            "vq_decode_s", "text_to_image_s_per_image", "peak_rss_mb"}
    for entry in metrics.values():
        assert entry["vlmkit"] > 0 and entry["transformers"] > 0 and entry["ratio"] > 0
    for batch in (1, 4):
        decode = metrics[f"decode_ms_per_step_batch{batch}"]
        assert {"vlmkit_tokens_per_s", "transformers_tokens_per_s", "vlmkit_pct_of_bandwidth_bound",
                "transformers_pct_of_bandwidth_bound"} <= set(decode)
    assert metrics["image_token_loop_s"]["steps_run"] == 2
    assert "vlmkit_speedup_over_first_image" in metrics["first_token_repeated_image_s"]
    assert "| decode batch 1, ms/step |" in result.stdout
