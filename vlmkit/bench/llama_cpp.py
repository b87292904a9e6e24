"""llama.cpp rows for the quantized benchmark: the same random-weight Janus-Pro language model decoded by
llama.cpp in BF16 and Q8_0, timed by its own ``llama-bench`` (token generation at batch 1 after a short
context, on the same number of threads).

Where llama.cpp comes from: ``--llama-cpp DIR`` or ``$VLMKIT_LLAMA_CPP``, a llama.cpp source tree with
``build/bin/llama-bench`` in it; else the tree that ``--build-llama-cpp`` left in the cache folder. That
option fetches the ``llama-cpp-python`` sdist from PyPI (it vendors the whole llama.cpp tree) and builds
``llama-bench`` with cmake (once; 25 minutes with one compile job on this 2-core machine). Without a tree the rows are skipped.

The checkpoint is converted with the tree's own ``convert_hf_to_gguf.py`` (the language model only, as a
LLaMA GGUF), once per checkpoint and type. The converter refuses tokenizers it does not know by the hash
of their output; decode speed does not depend on the tokenizer, so the conversion names a known
pre-tokenizer ("llama-bpe") for ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# variant name -> GGUF type written by convert_hf_to_gguf.py
VARIANTS = {"llama.cpp bf16": "bf16", "llama.cpp q8_0": "q8_0"}
SDIST = "llama-cpp-python"
BENCH_BINARY = Path("build") / "bin" / "llama-bench"
CONTEXT_TOKENS = 32  # decode after a short context, as the vlmkit rows do after a short prompt

_CONVERT = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
from conversion import base
def no_sentencepiece(self):  # ours is a BPE tokenizer.json: skip the sentencepiece attempt (and its import)
    raise FileNotFoundError("tokenizer.model")
base.TextModel._set_vocab_sentencepiece = no_sentencepiece
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama-bpe"  # our tokenizer is unknown to it
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def find_tree(explicit: str | None, cache_dir: Path) -> Path | None:
    """The llama.cpp tree to use (with ``llama-bench`` built), or None."""
    for candidate in (explicit, os.environ.get("VLMKIT_LLAMA_CPP"), _built_tree(cache_dir)):
        if candidate and not missing_files(Path(candidate)):
            return Path(candidate)
    if explicit:
        raise FileNotFoundError(f"--llama-cpp {explicit}: no {BENCH_BINARY} and convert_hf_to_gguf.py there")
    return None


def missing_files(tree: Path) -> list[str]:
    """What a llama.cpp tree lacks of what the benchmark runs: the built ``llama-bench`` and the converter."""
    return [str(name) for name in (BENCH_BINARY, Path("convert_hf_to_gguf.py")) if not (tree / name).is_file()]


def _built_tree(cache_dir: Path) -> Path | None:
    trees = sorted(cache_dir.glob("llama-cpp-src/*/vendor/llama.cpp"))
    return trees[-1] if trees else None


def build(cache_dir: Path, log) -> Path:
    """Fetch the llama-cpp-python sdist and build ``llama-bench`` from its vendored llama.cpp tree."""
    source = cache_dir / "llama-cpp-src"
    source.mkdir(parents=True, exist_ok=True)
    if _built_tree(cache_dir) is None:
        log(f"[llama.cpp] fetching the {SDIST} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(source)], check=True, capture_output=True, timeout=1800)
        archive = max(source.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(source, filter="data")
    tree = _built_tree(cache_dir)
    if not (tree / BENCH_BINARY).is_file():
        log("[llama.cpp] building llama-bench (once; tens of minutes on 2 cores)")
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], cwd=tree, check=True,
                       capture_output=True)
        subprocess.run(["cmake", "--build", "build", "--target", "llama-bench", "-j", jobs], cwd=tree, check=True,
                       capture_output=True)
    return tree


def gguf_file(tree: Path, checkpoint: Path, gguf_type: str, cache_dir: Path, log) -> Path:
    """The checkpoint's language model as a GGUF of ``gguf_type``, converted once."""
    out = cache_dir / "gguf" / f"{checkpoint.name}-{gguf_type}.gguf"
    if not out.is_file():
        log(f"[llama.cpp] converting {checkpoint.name} to {gguf_type}")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        result = subprocess.run([sys.executable, "-c", _CONVERT, str(tree), str(checkpoint), "--outtype", gguf_type,
                                 "--outfile", str(partial)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed on {checkpoint}:\n{result.stderr[-3000:]}")
        partial.rename(out)
    return out


def decode_row(tree: Path, model: Path, args) -> dict:
    """``llama-bench``'s decode time at batch 1 on ``model``: the same keys as the vlmkit rows (its peak
    RSS taken from the process's own resource usage; llama-bench reports no load time)."""
    command = [str(tree / BENCH_BINARY), "-m", str(model), "-p", "0", "-n", str(args.decode_tokens),
               "-d", str(CONTEXT_TOKENS), "-t", str(args.threads), "-r", str(args.repeats), "-o", "json"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # its shared libraries sit beside it (the build's own runpath breaks if the tree moves)
        env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
            filter(None, [str(tree / BENCH_BINARY.parent), os.environ.get("LD_LIBRARY_PATH")])))
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {process.returncode}):\n{stderr[-3000:]}")
    test = json.loads(stdout)[-1]
    decode_ms = test["avg_ns"] / test["n_gen"] / 1e6
    samples = [ns / test["n_gen"] / 1e6 for ns in test.get("samples_ns", [])]
    return {"decode_ms_per_step": decode_ms, "tokens_per_s": 1e3 / decode_ms, "decode_samples_ms": samples,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def llama_cpp_rows(checkpoint: Path, args, log) -> dict:
    """{variant: row} for llama.cpp BF16 and Q8_0, or {} (logged) where no llama.cpp tree is found."""
    cache_dir = Path(args.cache_dir)
    if getattr(args, "build_llama_cpp", False):
        build(cache_dir, log)
    tree = find_tree(getattr(args, "llama_cpp", None), cache_dir)
    if tree is None:
        log("[llama.cpp] no llama.cpp build found (--llama-cpp DIR or --build-llama-cpp): its rows are skipped")
        return {}
    rows = {}
    for name, gguf_type in VARIANTS.items():
        model = gguf_file(tree, checkpoint, gguf_type, cache_dir, log)
        log(f"[quantized] {name}")
        started = time.perf_counter()
        rows[name] = decode_row(tree, model, args)
        rows[name]["bench_s"] = time.perf_counter() - started
    return rows

