"""``vlmkit bench`` runs from the installed package: end to end on the tiny size through the ``vlmkit``
entry point (outside the checkout, nothing on the path but the package), and nothing in ``vlmkit/``
reaches outside the package for it (nothing here is timed)."""

import ast
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vlmkit"


def vlmkit_command() -> list[str]:
    """The ``vlmkit`` console script of this environment (what ``pip install`` puts on PATH)."""
    (script,) = entry_points(group="console_scripts", name="vlmkit")
    assert script.value == "vlmkit.cli:main"
    installed = Path(sys.executable).with_name("vlmkit")
    if installed.is_file():
        return [str(installed)]
    return [sys.executable, "-c", "import sys; from vlmkit.cli import main; sys.exit(main())"]


def test_tiny_benchmark_runs_from_the_entry_point_and_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [*vlmkit_command(), "bench", "--size", "tiny", "--family", "janus", "--repeats", "1", "--decode-tokens", "2",
         "--steps", "2", "--images-at-once", "2", "--constrained", "--cache-dir", str(tmp_path / "checkpoints"),
         "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["memory_bandwidth_gb_s"] > 0
    settings = report["settings"]
    assert {"dtype", "threads", "cpu", "kernels", "torch", "transformers"} <= set(settings)
    assert {"model", "cores", "class", "flags", "kernels"} <= set(settings["cpu"])
    assert settings["kernels"] == settings["cpu"]["kernels"]
    janus = report["families"]["janus"]
    assert janus["decode_weight_bytes"] > 0 and janus["bandwidth_bound_ms"] > 0
    metrics = janus["metrics"]
    assert set(metrics) == {"preprocess_ms_per_image", "first_token_s", "first_token_repeated_image_s",
                            "decode_ms_per_step_batch1", "decode_ms_per_step_batch4", "image_token_loop_s",
                            "vq_decode_s", "text_to_image_s_per_image", "images_per_minute_n2", "peak_rss_mb"}
    for entry in metrics.values():
        assert entry["vlmkit"] > 0 and entry["transformers"] > 0 and entry["ratio"] > 0
    for batch in (1, 4):
        decode = metrics[f"decode_ms_per_step_batch{batch}"]
        assert {"vlmkit_tokens_per_s", "transformers_tokens_per_s", "vlmkit_pct_of_bandwidth_bound",
                "transformers_pct_of_bandwidth_bound"} <= set(decode)
        assert decode["bandwidth_gb_s"] > 0
        assert {engine: len(gb_s) for engine, gb_s in decode["bandwidths_gb_s"].items()} == {"vlmkit": 1,
                                                                                              "transformers": 1}
    assert metrics["image_token_loop_s"]["steps_run"] == 2
    assert metrics["images_per_minute_n2"]["unit"] == "images/min"
    assert "text-to-image: 2 at once, images/min" in result.stdout
    constrained = report["constrained_janus"]
    assert constrained["unconstrained_ms"] > 0 and constrained["json_schema_ms"] > 0 and constrained["ratio"] > 0
    assert "constrained decoding" in result.stdout
    assert "vlmkit_speedup_over_first_image" in metrics["first_token_repeated_image_s"]
    cpu, header = settings["cpu"], result.stdout.splitlines()[0]
    assert header.startswith(f"CPU: {cpu['model']} ({cpu['cores']} cores), {cpu['class']} [")
    assert header.endswith(f"], vlmkit kernels: {cpu['kernels']}")
    assert "| decode batch 1, ms/step |" in result.stdout


def test_bench_without_transformers_says_how_to_install_it(tmp_path):
    blocked = "import sys; sys.modules['transformers'] = None; from vlmkit.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", blocked, "bench", "--size", "tiny"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "vlmkit bench compares against transformers: pip install 'vlmkit[bench]'"


def test_importing_the_benchmark_does_not_import_transformers():
    code = ("import sys, vlmkit, vlmkit.cli, vlmkit.bench.run, vlmkit.bench.quantized, vlmkit.bench.batch_throughput; "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"


def outside_reaches(source: str) -> list[str]:
    """Imports of a top-level ``benchmarks`` package and any use of ``sys.path``, in one module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] == "benchmarks"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "benchmarks":
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            found.append(f"sys.path (line {node.lineno})")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__" \
                and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).split(".")[0] == "benchmarks":
            found.append("__import__('benchmarks...')")
    return found


def test_the_scan_catches_what_it_looks_for():
    source = "import benchmarks.bench\nfrom benchmarks import x\nimport sys\nsys.path.insert(0, '.')\n"
    assert len(outside_reaches(source)) == 3
    assert outside_reaches("from .bench import run\nimport vlmkit.bench\nSCRIPT = 'sys.path[:0] = []'\n") == []


def test_nothing_in_the_package_imports_benchmarks_or_edits_sys_path():
    offenders = {str(path.relative_to(PACKAGE.parent)): reaches for path in sorted(PACKAGE.rglob("*.py"))
                 if (reaches := outside_reaches(path.read_text()))}
    assert offenders == {}


def test_a_whole_image_counts_the_prompts_prefill_once_and_every_further_token_at_the_mean_step():
    from vlmkit.bench.families import Janus
    family = Janus.__new__(Janus)  # no checkpoint: the timing of a run is given
    family.image_token_times = lambda engine, steps, images=1: (2.0, [0.1, 0.3, 0.2])
    family.num_image_tokens = lambda: 576
    assert abs(family.image_loop_seconds("vlmkit", 4) - (2.0 + 575 * 0.2)) < 1e-9


def test_the_share_of_the_bound_takes_each_rounds_own_bandwidth():
    from vlmkit.bench.measure import pct_of_bound
    # 1 GB a step: at 10 GB/s a 0.1 s step is at the bound (100%), at 20 GB/s it is at half (50%)
    assert pct_of_bound(10**9, [10.0, 20.0], [0.1, 0.1]) == 75.0


def test_each_timed_run_takes_the_mean_bandwidth_measured_just_before_and_after_it():
    from vlmkit.bench.measure import alternate_with_bandwidth
    events, readings = [], iter([10.0, 20.0, 30.0, 50.0, 1.0, 3.0, 5.0, 7.0])

    def measure():
        events.append("bandwidth")
        return next(readings)

    def engine(name, value):
        return lambda: events.append(name) or value

    samples, bandwidths = alternate_with_bandwidth({"a": engine("a", 1.0), "b": engine("b", 2.0)}, measure, 2)
    # the warm-up round is not bracketed and not recorded; every timed run is measured on both sides
    assert events == ["a", "b"] + ["bandwidth", "a", "bandwidth", "bandwidth", "b", "bandwidth"] * 2
    assert samples == {"a": [1.0, 1.0], "b": [2.0, 2.0]}
    assert bandwidths == {"a": [15.0, 2.0], "b": [40.0, 6.0]}



@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "argument --repeats: must be 1 or more, got 0"),
    (["--threads", "-1"], "argument --threads: must be 1 or more"),
    (["--decode-tokens", "ten"], "argument --decode-tokens: 'ten' is not a whole number"),
    (["--steps", "0"], "argument --steps: must be 1 or more"),
    (["--vq-grid", "-2"], "argument --vq-grid: must be 0 or more"),
    (["--first-token-repeats", "-1"], "argument --first-token-repeats: must be 1 or more"),
    (["--quantize", "int3"], "argument --quantize: 'int3': use int8, int4, bnb, bnb8 or all"),
    (["--images-at-once", "4,0"], "argument --images-at-once: must be 1 or more, got 0"),
])
def test_bench_refuses_bad_values_before_it_measures(argv, message, capsys):
    from vlmkit.bench.run import main
    with pytest.raises(SystemExit) as exit_:
        main(["--size", "tiny", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_bench_refuses_outputs_it_could_not_write_before_it_measures(tmp_path, capsys):
    from vlmkit.bench.run import main
    (tmp_path / "a_file").write_text("keep")
    for argv, message in ((["--cache-dir", str(tmp_path / "a_file")], "is a file; give a folder"),
                          (["--cache-dir", str(tmp_path / "a_file" / "sub")], "cannot be created or written"),
                          (["--json", str(tmp_path / "missing" / "r.json")], "does not exist; create it"),
                          (["--json", str(tmp_path)], "is a folder; give a file name")):
        with pytest.raises(SystemExit):
            main(["--size", "tiny", *argv])
        assert message in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "keep"


def test_bench_names_the_extra_a_figure_needs_when_it_is_missing(monkeypatch):
    import argparse
    import importlib.util

    from vlmkit.bench import options, run
    installed = importlib.util.find_spec
    monkeypatch.setattr(options.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("bitsandbytes", "llguidance") else installed(name, *a))
    asked = argparse.Namespace(quantize="int8,bnb", constrained=False)
    assert run._missing_extra(asked) == \
        "vlmkit bench: --quantize bnb, bnb8 or all needs bitsandbytes: pip install 'vlmkit[bnb]'"
    assert run._missing_extra(argparse.Namespace(quantize="int8", constrained=True)) == \
        "vlmkit bench: --constrained needs llguidance: pip install 'vlmkit[serve]'"
    assert run._missing_extra(argparse.Namespace(quantize="int4", constrained=False)) is None
