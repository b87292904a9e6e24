"""What this CPU can run, read once from the operating system (and, for the kernels, confirmed by the CPU's
own CPUID): the instruction sets vlmkit's compiled kernels are built for, and the CPU class the benchmark
names in its header.

``VLMKIT_CPU_KERNELS`` chooses the kernels (see ``kernel_isa``): ``auto`` (the default: the widest this
CPU runs), ``avx512`` or ``avx2`` to force one (for tests and comparisons; one the CPU lacks falls back
to the next it has, with a warning), ``off`` (also ``0``) for torch's portable path everywhere, as on
ARM and x86 CPUs without AVX2. ``1``/``on`` mean ``auto``. ``avx512-emulated`` builds the AVX-512 kernels on
SIMDe's portable intrinsics (Debian: ``apt-get install libsimde-dev``) and runs them on any CPU with AVX2: to
check their arithmetic where no AVX-512 CPU is at hand, many times slower than either real set."""

from __future__ import annotations

import os
import platform
import warnings
from functools import cache
from pathlib import Path

# The instruction-set variants of the compiled kernels, widest first, and the CPU flags each needs.
ISA_FLAGS = {
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx2", "fma"}),
    "avx2": frozenset({"avx2", "fma"}),
}
# Flags that decide which of vlmkit's paths a CPU takes, in the order the benchmark header lists them.
FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16",
                     "amx_int8", "asimd", "sve")
OFF = ("0", "off", "false", "no", "none", "portable")
EMULATED_AVX512 = "avx512-emulated"


@cache
def cpu_flags() -> frozenset:
    """The CPU's feature flags as Linux names them in /proc/cpuinfo (``flags`` on x86, ``Features`` on
    ARM); empty where they cannot be read (then only torch's portable path runs)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# What the CPU itself (CPUID, as torch's cpuinfo reads it) must confirm for each variant: /proc/cpuinfo shows
# a program under an emulator (qemu-user) the host's flags, not those of the CPU it runs on.
CPUID_CHECKS = {"avx2": ("_is_avx2_supported",),
                "avx512": ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported")}


def cpu_runs(isa: str) -> bool:
    """Whether the CPU's own CPUID confirms ``isa`` (torch.cpu's checks); True where torch cannot tell."""
    import torch

    try:
        return all(getattr(torch.cpu, check)() for check in CPUID_CHECKS[isa])
    except (AttributeError, RuntimeError):
        return True


def kernel_setting() -> str:
    """``VLMKIT_CPU_KERNELS`` as given (lower case), ``auto`` when unset."""
    return os.environ.get("VLMKIT_CPU_KERNELS", "auto").strip().lower() or "auto"


@cache
def kernel_isa() -> str | None:
    """The instruction set vlmkit's compiled kernels run with here (``avx512`` or ``avx2``), or None for
    torch's portable path (turned off, or a CPU without AVX2 and FMA)."""
    setting = kernel_setting()
    if setting in OFF:
        return None
    supported = [isa for isa, flags in ISA_FLAGS.items() if flags <= cpu_flags() and cpu_runs(isa)]
    if setting == EMULATED_AVX512:
        if "avx2" in supported and simde_headers() is not None:
            return "avx512"
        lack = "SIMDe's headers (Debian: apt-get install libsimde-dev)" if "avx2" in supported else "AVX2 and FMA"
        warnings.warn(f"VLMKIT_CPU_KERNELS={setting} needs {lack}; using {supported[0] if supported else 'torch portable path'}",
                      stacklevel=2)
        return supported[0] if supported else None
    if setting in ISA_FLAGS:
        if setting in supported:
            return setting
        fallback = next((isa for isa in supported if list(ISA_FLAGS).index(isa) > list(ISA_FLAGS).index(setting)),
                        None)
        missing = " ".join(sorted(ISA_FLAGS[setting] - cpu_flags()))
        lack = f"lacks {missing}" if missing else "lists its flags, but its CPUID denies them"
        warnings.warn(f"VLMKIT_CPU_KERNELS={setting}: this CPU {lack}; using {fallback or 'torch portable path'}",
                      stacklevel=2)
        return fallback
    if setting not in ("auto", "1", "on", "true", "yes"):
        warnings.warn(f"VLMKIT_CPU_KERNELS={setting!r} is not one of auto, avx512, avx2, off, {EMULATED_AVX512}; using auto",
                      stacklevel=2)
    return supported[0] if supported else None


def kernels_emulated() -> bool:
    """Whether the AVX-512 kernels run emulated (``VLMKIT_CPU_KERNELS=avx512-emulated``, where it can)."""
    return kernel_setting() == EMULATED_AVX512 and kernel_isa() == "avx512"


def isa_runs_here(isa: str) -> bool:
    """Whether the kernels of ``isa`` can run in this process: the CPU has it, or it is emulated."""
    return (ISA_FLAGS[isa] <= cpu_flags() and cpu_runs(isa)) or (isa == "avx512" and kernels_emulated())


def simde_headers() -> Path | None:
    """The folder holding SIMDe's AVX-512 headers (``simde/x86/avx512.h``) on the compiler's usual include
    path, or None."""
    folders = [*os.environ.get("CPATH", "").split(os.pathsep), *os.environ.get("CPLUS_INCLUDE_PATH", "").split(os.pathsep),
               "/usr/local/include", "/usr/include"]
    return next((Path(f) for f in folders if f and (Path(f) / "simde" / "x86" / "avx512.h").is_file()), None)


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX-512 BF16 or AMX): there torch's bf16 GEMM and
    convolutions are fast, so prefill and vision towers stay in bf16. The AVX-512 kernels emulated take the
    paths of such a CPU too."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}) or kernels_emulated()


def cpu_class() -> str:
    """A short name of this CPU's class as the benchmark reports it, e.g. ``x86-64 AVX-512 BF16`` or
    ``x86-64 AVX2 (no native bf16)``."""
    flags, machine = cpu_flags(), platform.machine() or "unknown"
    if "amx_bf16" in flags:
        return f"{machine} AMX-BF16"
    if "avx512_bf16" in flags:
        return f"{machine} AVX-512 BF16"
    if "avx512f" in flags:
        return f"{machine} AVX-512 (no native bf16)"
    if "avx2" in flags:
        return f"{machine} AVX2 (no native bf16)"
    return f"{machine} (no AVX2: torch's portable path)"


def cpu_description() -> dict:
    """The CPU as the benchmark's header names it: model, cores, class, the flags that matter, and the
    kernel variant vlmkit runs here."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "class": cpu_class(),
            "flags": [f for f in FLAGS_THAT_MATTER if f in cpu_flags()],
            "kernels": EMULATED_AVX512 if kernels_emulated() else kernel_isa() or "portable"}
