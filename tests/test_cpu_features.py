"""Which kernel variant a CPU gets (nn/cpu_features.py): the widest its flags allow, what
VLMKIT_CPU_KERNELS forces (a variant the CPU lacks falls back, with a warning naming the missing flags),
and the CPU class the benchmark names, for the classes vlmkit knows."""

import pytest

from vlmkit.nn import cpu_features

ZEN4 = frozenset("fma avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16".split())
HASWELL = frozenset("fma avx2".split())
ARM = frozenset("fp asimd sve".split())


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given flags and kernel setting; the cached answers are recomputed."""
    def pretend(flags, setting=None, cpuid_runs=tuple(cpu_features.ISA_FLAGS)):
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda: flags)
        monkeypatch.setattr(cpu_features, "cpu_runs", lambda isa: isa in cpuid_runs)
        if setting is None:
            monkeypatch.delenv("VLMKIT_CPU_KERNELS", raising=False)
        else:
            monkeypatch.setenv("VLMKIT_CPU_KERNELS", setting)
        cpu_features.kernel_isa.cache_clear()
    yield pretend
    monkeypatch.undo()
    cpu_features.kernel_isa.cache_clear()


@pytest.mark.parametrize("flags,setting,isa", [
    (ZEN4, None, "avx512"), (ZEN4, "auto", "avx512"), (ZEN4, "1", "avx512"), (ZEN4, "avx2", "avx2"),
    (ZEN4, "off", None), (ZEN4, "0", None), (HASWELL, None, "avx2"), (HASWELL, "AVX2", "avx2"),
    (ARM, None, None), (frozenset(), None, None)])
def test_the_widest_variant_the_cpu_runs_unless_told_otherwise(cpu, flags, setting, isa):
    cpu(flags, setting)
    assert cpu_features.kernel_isa() == isa


def test_a_variant_the_cpu_lacks_falls_back_and_names_the_missing_flags(cpu):
    cpu(HASWELL, "avx512")
    with pytest.warns(UserWarning, match="lacks avx512_bf16 avx512_vnni avx512bw avx512f avx512vl; using avx2"):
        assert cpu_features.kernel_isa() == "avx2"
    cpu(ARM, "avx2")
    with pytest.warns(UserWarning, match="lacks avx2 fma; using torch portable path"):
        assert cpu_features.kernel_isa() is None


def test_a_variant_the_cpus_own_cpuid_denies_is_not_taken(cpu):
    """Under an emulator /proc/cpuinfo lists the host's flags: the CPU's CPUID decides (no SIGILL)."""
    cpu(ZEN4, cpuid_runs=("avx2",))
    assert cpu_features.kernel_isa() == "avx2"
    cpu(ZEN4, cpuid_runs=())
    assert cpu_features.kernel_isa() is None
    cpu(ZEN4, "avx512", cpuid_runs=("avx2",))
    with pytest.warns(UserWarning, match="lists its flags, but its CPUID denies them; using avx2"):
        assert cpu_features.kernel_isa() == "avx2"


def test_this_cpus_cpuid_confirms_what_its_flags_list():
    for isa, flags in cpu_features.ISA_FLAGS.items():
        if flags <= cpu_features.cpu_flags():
            assert cpu_features.cpu_runs(isa), isa


def test_an_unknown_setting_warns_and_means_auto(cpu):
    cpu(ZEN4, "fastest")
    with pytest.warns(UserWarning, match="not one of auto, avx512, avx2, off, avx512-emulated"):
        assert cpu_features.kernel_isa() == "avx512"


def test_the_avx512_kernels_emulated_run_as_on_an_avx512_bf16_cpu_on_any_cpu_with_avx2(cpu, monkeypatch, tmp_path):
    """``avx512-emulated``: the AVX-512 kernels built on SIMDe's intrinsics where its headers are on the
    compiler's path, and the native-bf16 paths such a CPU takes; without the headers (or without AVX2) a
    warning naming what is missing, and the next variant."""
    (tmp_path / "simde" / "x86").mkdir(parents=True)
    (tmp_path / "simde" / "x86" / "avx512.h").write_text("")
    monkeypatch.setenv("CPATH", str(tmp_path))
    cpu(HASWELL, "avx512-emulated")
    assert cpu_features.simde_headers() == tmp_path
    assert cpu_features.kernel_isa() == "avx512" and cpu_features.kernels_emulated()
    assert cpu_features.native_bf16() and cpu_features.isa_runs_here("avx512")
    assert cpu_features.cpu_description()["kernels"] == "avx512-emulated"
    monkeypatch.setattr(cpu_features, "simde_headers", lambda: None)
    cpu(HASWELL, "avx512-emulated")
    with pytest.warns(UserWarning, match="needs SIMDe's headers .*apt-get install libsimde-dev.*; using avx2"):
        assert cpu_features.kernel_isa() == "avx2"
    assert not cpu_features.kernels_emulated() and not cpu_features.native_bf16()
    assert not cpu_features.isa_runs_here("avx512")
    cpu(ARM, "avx512-emulated")
    with pytest.warns(UserWarning, match="needs AVX2 and FMA; using torch portable path"):
        assert cpu_features.kernel_isa() is None


@pytest.mark.parametrize("flags,name,native", [
    (ZEN4, "AVX-512 BF16", True), (ZEN4 | {"amx_bf16"}, "AMX-BF16", True),
    (frozenset("fma avx2 avx512f avx512bw avx512vl".split()), "AVX-512 (no native bf16)", False),
    (HASWELL, "AVX2 (no native bf16)", False), (ARM, "no AVX2", False)])
def test_the_cpu_class_names_what_decides_the_paths(cpu, flags, name, native):
    cpu(flags)
    assert name in cpu_features.cpu_class()
    assert cpu_features.native_bf16() is native
    described = cpu_features.cpu_description()
    assert described["class"] == cpu_features.cpu_class()
    assert set(described["flags"]) <= flags and described["kernels"] == (cpu_features.kernel_isa() or "portable")
