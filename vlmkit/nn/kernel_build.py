"""Building and loading vlmkit's compiled CPU kernels (``csrc/``): compiled once with torch's extension
builder (needs a C++ compiler; about a minute) into ``~/.cache/vlmkit/kernels`` (``VLMKIT_KERNEL_CACHE``),
in a folder named by a hash of the sources, torch's version and the compiler flags, then loaded by every
later process; the products set to the instruction set ``cpu_features.kernel_isa`` chose. Where nothing can
be built, None, and ``cpu_kernels`` runs torch's ops."""

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from .cpu_features import kernel_isa, kernels_emulated

_SOURCES = Path(__file__).with_name("csrc")

_state = {"op": None, "tried": False}
_lock = threading.Lock()

# The prefill kernels split their work over torch's own OpenMP threads (at::parallel_for, -fopenmp: the
# runtime they link is the libgomp.so.1 torch has already loaded). A compiler without OpenMP builds them
# without it; they then split it over vlmkit's own helper threads.
_BUILD_FLAGS = (["-O3", "-mavx2", "-mfma", "-fopenmp"], ["-O3", "-mavx2", "-mfma"])
# The AVX-512 kernels on SIMDe's portable intrinsics (cpu_features.kernels_emulated): a build of its own.
_EMULATION_FLAGS = ["-DVLMKIT_EMULATED_AVX512", "-Wno-psabi"]


def build_flag_sets() -> list[list[str]]:
    """The compiler flag sets to try, in order, for this process's kernels."""
    extra = _EMULATION_FLAGS if kernels_emulated() else []
    return [flags + extra for flags in _BUILD_FLAGS]


def _build_directory(flags: list[str]) -> Path:
    root = Path(os.environ.get("VLMKIT_KERNEL_CACHE") or Path.home() / ".cache" / "vlmkit" / "kernels")
    digest = hashlib.sha256()
    for path in sorted(_SOURCES.glob("*.[ch]*")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(torch.__version__.encode() + " ".join(flags).encode())
    folder = root / f"decode_kernels-{digest.hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    for left in folder.glob("building-*"):  # private build folders of builds that were killed
        with contextlib.suppress(OSError):
            if time.time() - left.stat().st_mtime > 3600:
                shutil.rmtree(left, ignore_errors=True)
    return folder


def compiled_kernels():
    """``torch.ops.vlmkit`` with the compiled kernels set to this CPU's instruction set, built on first use
    on any CPU with AVX2/FMA; None where unavailable (no such CPU, turned off, or no compiler)."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["op"] = _select_isa(_load()) if kernel_isa() is not None else None
                _state["tried"] = True
    return _state["op"]


def _select_isa(ops):
    """``ops`` with its products set to ``kernel_isa()``; the AVX2 ones where this build lacks AVX-512 or the
    CPU itself (CPUID) denies what /proc/cpuinfo listed."""
    if ops is not None and not ops.set_kernel_isa(kernel_isa()):
        warnings.warn(f"vlmkit: the compiler built no {kernel_isa()} kernels or this CPU cannot run them; using avx2",
                      stacklevel=4)
        ops.set_kernel_isa("avx2")
    return ops


def active_kernel_isa() -> str | None:
    """The instruction set the compiled products run with (``avx512`` or ``avx2``), building them if need
    be; None where torch's ops run instead."""
    ops = compiled_kernels()
    return None if ops is None else ops.kernel_isa()


def _load():
    if hasattr(torch.ops, "vlmkit") and hasattr(torch.ops.vlmkit, "decode_attention_bf16"):
        return torch.ops.vlmkit
    sources = [str(path) for path in sorted(_SOURCES.glob("*.cpp"))]

    announced = False  # once, though a failed flag set is followed by the next one

    def compile_and_load(flags: list[str], private: Path):
        from torch.utils.cpp_extension import load
        nonlocal announced
        if not announced:
            print("vlmkit: compiling the CPU decode kernels once (about a minute)...", file=sys.stderr)
            announced = True
        load(LIBRARY_FILE.removesuffix(".so"), sources, build_directory=str(private), is_python_module=False,
             extra_cflags=flags, extra_ldflags=[flag for flag in flags if flag == "-fopenmp"], verbose=False)

    def build(flags: list[str], folder: Path):
        load_or_build(folder, lambda private: compile_and_load(flags, private), torch.ops.load_library)
        return torch.ops.vlmkit

    return build_with_first_working_flags(build_flag_sets(), build)


LIBRARY_FILE = "vlmkit_decode_kernels.so"


def load_or_build(folder: Path, compile_and_load, load_library) -> None:
    """Loads the kernels' library kept in ``folder``; where there is none, or it does not load, compiles and
    loads one in a private folder (``compile_and_load(private)``) and renames a copy into ``folder``.

    A process runs the library file it loaded as its code, and the linker truncates and rewrites an existing
    output file in place, which ends a process running that file (bus error). So no build writes into the
    shared folder: processes of other checkouts or virtual environments with the same sources, whose build
    commands differ, would otherwise rebuild the library under one another."""
    library = folder / LIBRARY_FILE
    if library.exists():
        try:
            load_library(str(library))
            return
        except OSError as err:  # cut short by a full disk, or foreign: built again below
            warnings.warn(f"vlmkit: {library} did not load ({err}); compiling it again", stacklevel=5)
    with tempfile.TemporaryDirectory(dir=folder, prefix="building-") as private:
        compile_and_load(Path(private))
        staged = folder / f".{LIBRARY_FILE}.{os.getpid()}"
        shutil.copy(Path(private) / LIBRARY_FILE, staged)
        os.replace(staged, library)


# Written into a flag set's build folder when it failed and a later set built: later processes skip it
# (a compiler without OpenMP would otherwise re-run the failing -fopenmp compile, seconds, at every start).
# Without a later success nothing is written, so a compiler installed afterwards is picked up.
_FAILED_MARKER = "failed"


def build_with_first_working_flags(flag_sets, build):
    """``build(flags, folder)`` for the first of ``flag_sets`` that builds, skipping sets marked failed by an
    earlier process; None, with a warning, where none builds (decoding still works, at torch's speed)."""
    failed, failure = [], None
    for flags in flag_sets:
        try:
            folder = _build_directory(flags)
        except OSError as err:  # a read-only home, a file in the way: no flag set can build
            warnings.warn(f"vlmkit: the CPU decode kernels have no folder to be built in ({err}); using torch's "
                          f"slower ops. Set VLMKIT_KERNEL_CACHE to a folder you can write", stacklevel=4)
            return None
        if (folder / _FAILED_MARKER).exists():
            continue
        try:
            ops = build(flags, folder)
        except Exception as err:  # no compiler, no headers, no OpenMP...
            failed.append(folder)
            failure = err
            continue
        for earlier in failed:
            with contextlib.suppress(OSError):  # only spares the next process a failing build
                (earlier / _FAILED_MARKER).write_text(f"{type(failure).__name__}: {str(failure).strip()[:2000]}\n")
        return ops
    warnings.warn(f"vlmkit: the CPU decode kernels could not be built ({type(failure).__name__}: "
                  f"{str(failure).strip()[:300]}); using torch's slower ops. They need a C++ compiler "
                  f"(Debian/Ubuntu: apt-get install g++); VLMKIT_CPU_KERNELS=off skips them without this warning",
                  stacklevel=4)
    return None
