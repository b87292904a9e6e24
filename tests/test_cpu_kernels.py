"""vlmkit's CPU paths (nn/cpu_kernels.py): the compiled kernels agree with torch's own ops (bf16) or the
float product (int8, int4) for every instruction-set variant this CPU runs (AVX2, AVX-512 BF16/VNNI), odd
widths, 1-9 rows and unaligned weights; bf16 prefill and convolutions computed in fp32 agree with torch
on CPUs without native bf16; float32 never leaves torch's path.

The kernels run on x86 CPUs with AVX2 and FMA (and need a C++ compiler); a variant this CPU lacks is
skipped with the flags it misses. ``VLMKIT_CPU_KERNELS=off`` (``.ci/run`` runs these tests so too) turns
them off: the tests of torch's portable path then still run. ``VLMKIT_CPU_KERNELS=avx512-emulated`` runs the
AVX-512 variant on any AVX2 CPU, its intrinsics emulated (``.ci/run`` does so where the CPU lacks them)."""

import mmap
import os
import shutil

import pytest
import torch
from torch.nn import functional as F

from vlmkit.nn import cpu_kernels, kernel_build
from vlmkit.nn.cpu_features import ISA_FLAGS, cpu_flags, isa_runs_here, kernel_isa
from vlmkit.nn.decoder import DecoderConfig, DecoderModel
from vlmkit.nn.kv_cache import KVCache
from vlmkit.nn.layers import Conv2d, Linear
from vlmkit.nn.norms import RMSNorm
from vlmkit.nn.rotary import RotaryEmbedding, rotate
from vlmkit.quant.weight_only import Int4Linear, Int8Linear, pack_nibbles

# Skipped only where the kernels cannot run: a CPU without AVX2/FMA, turned off, or no C++ compiler.
# Where they can, a build that fails is a failure (decoding would still work, silently slower).
HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_kernels = pytest.mark.skipif(not (cpu_kernels.kernels_enabled() and HAS_COMPILER),
                                   reason=f"kernels off (VLMKIT_CPU_KERNELS={os.environ.get('VLMKIT_CPU_KERNELS')}),"
                                          " no AVX2/FMA CPU or no C++ compiler here")


def _isa_param(isa: str):
    missing = " ".join(sorted(ISA_FLAGS[isa] - cpu_flags())) or "them (its CPUID denies them)"
    return pytest.param(isa, marks=pytest.mark.skipif(not isa_runs_here(isa), reason=f"this CPU lacks {missing}"))


@pytest.fixture(params=[_isa_param(isa) for isa in ISA_FLAGS])
def isa(request):
    """Each instruction-set variant of the products this CPU runs, set for the test and restored after."""
    if not (cpu_kernels.kernels_enabled() and HAS_COMPILER):
        pytest.skip("kernels off, no AVX2/FMA CPU or no C++ compiler here")
    ops = kernel_build.compiled_kernels()
    previous = ops.kernel_isa()
    assert ops.set_kernel_isa(request.param), f"this build has no {request.param} kernels"
    yield request.param
    ops.set_kernel_isa(previous)


def test_the_kernels_build_wherever_they_can():
    if cpu_kernels.kernels_enabled() and HAS_COMPILER:
        assert kernel_build.compiled_kernels() is not None, "the kernels failed to build (see the warning)"
        assert kernel_build.active_kernel_isa() == kernel_isa()


@needs_kernels
def test_the_avx512_kernels_are_set_only_where_the_cpu_runs_them():
    """The compiled side asks the CPU itself before it takes the AVX-512 products (on a CPU without them they
    would end the process), so only a CPU with every flag they need gets them (or a build that emulates them);
    AVX2 is always there."""
    ops = kernel_build.compiled_kernels()
    previous = ops.kernel_isa()
    try:
        assert ops.set_kernel_isa("avx512") == isa_runs_here("avx512")
        assert ops.kernel_isa() == ("avx512" if isa_runs_here("avx512") else previous)
        assert ops.set_kernel_isa("avx2") and ops.kernel_isa() == "avx2"
        assert not ops.set_kernel_isa("sse")
    finally:
        ops.set_kernel_isa(previous)


def test_a_flag_set_that_failed_before_a_later_one_built_is_not_retried(tmp_path, monkeypatch):
    """A compiler without OpenMP fails the -fopenmp build: the next process goes straight to the build that
    worked, and nothing is marked where no flag set builds (a compiler installed later is then used)."""
    monkeypatch.setenv("VLMKIT_KERNEL_CACHE", str(tmp_path))
    attempts = []

    def build(flags, folder):
        attempts.append(flags)
        if "-fopenmp" in flags or "-broken" in flags:
            raise OSError("unsupported option")
        return "ops"

    flag_sets = (["-O3", "-fopenmp"], ["-O3"])
    assert kernel_build.build_with_first_working_flags(flag_sets, build) == "ops"
    assert attempts == [["-O3", "-fopenmp"], ["-O3"]]
    attempts.clear()
    assert kernel_build.build_with_first_working_flags(flag_sets, build) == "ops"
    assert attempts == [["-O3"]]

    attempts.clear()
    with pytest.warns(UserWarning, match="could not be built.*unsupported option"):
        assert kernel_build.build_with_first_working_flags((["-broken"],), build) is None
    with pytest.warns(UserWarning, match="could not be built.*apt-get install g\\+\\+.*VLMKIT_CPU_KERNELS=off"):
        assert kernel_build.build_with_first_working_flags((["-broken"],), build) is None
    assert attempts == [["-broken"], ["-broken"]]


def test_a_kernel_cache_that_cannot_be_made_falls_back_to_torchs_ops_and_names_the_fix(tmp_path, monkeypatch):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    monkeypatch.setenv("VLMKIT_KERNEL_CACHE", str(in_the_way / "kernels"))
    attempts = []
    with pytest.warns(UserWarning, match="no folder to be built in.*Set VLMKIT_KERNEL_CACHE to a folder you can write"):
        assert kernel_build.build_with_first_working_flags((["-O3"],), lambda flags, folder: attempts.append(flags)) is None
    assert attempts == []


def test_a_build_never_rewrites_a_library_another_process_runs(tmp_path):
    """A process runs the library file it loaded as its code: a build compiles in a private folder and renames
    its library into place, so a process holding the published one (here: a mapping of it) keeps its code;
    a published library is loaded as it is, and one that does not load is built again."""
    built, loaded = [], []

    def compile_and_load(content):
        def run(private):
            assert private.parent == tmp_path and private.name.startswith("building-")
            (private / kernel_build.LIBRARY_FILE).write_bytes(content)
            built.append(content)
        return run

    library = tmp_path / kernel_build.LIBRARY_FILE
    kernel_build.load_or_build(tmp_path, compile_and_load(b"first build"), loaded.append)
    assert library.read_bytes() == b"first build" and built == [b"first build"] and loaded == []
    kernel_build.load_or_build(tmp_path, compile_and_load(b"never built"), loaded.append)
    assert loaded == [str(library)] and built == [b"first build"]

    def refuses(path):
        raise OSError("not a library")

    with open(library, "rb") as running, mmap.mmap(running.fileno(), 0, access=mmap.ACCESS_READ) as code:
        with pytest.warns(UserWarning, match="did not load.*compiling it again"):
            kernel_build.load_or_build(tmp_path, compile_and_load(b"second build"), refuses)
        assert code[:] == b"first build"
    assert library.read_bytes() == b"second build"
    assert sorted(path.name for path in tmp_path.iterdir()) == [kernel_build.LIBRARY_FILE]


@needs_kernels
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="no /proc/self/maps to list loaded libraries")
def test_the_kernels_share_torchs_openmp_runtime():
    """The prefill kernels run on torch's OpenMP threads: the kernels' libgomp is torch's, not a second
    runtime with its own threads competing for the cores."""
    assert kernel_build.compiled_kernels() is not None
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes


def unaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose data starts one element past an aligned address (a view into a bigger buffer,
    as weights mapped from a file may be)."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    return view


def bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def close_to_fp32(got, weight, x, bias=None):
    """Within the rounding of a bf16 result (what torch's own bf16 matmul gets)."""
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    torch_bf16 = F.linear(x, weight, bias).float()
    tolerance = (torch_bf16 - expected).abs().max() + 1e-3
    return (got.float() - expected).abs().max() <= tolerance


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("width", [264, 37, 8, 2048])  # the tails of the 8-, 32- and 64-wide loops run too
def test_linear_kernel_matches_torch_for_several_weights_at_once(isa, rows, width):
    x = bf16(rows, 1, width)
    weights = [bf16(n, width, seed=n) for n in (64, 7, 130)]
    weights[1] = unaligned(weights[1])
    biases = [bf16(w.shape[0], seed=99) for w in weights]
    outputs = kernel_build.compiled_kernels().linear_bf16(x, weights, biases)
    assert [tuple(o.shape) for o in outputs] == [(rows, 1, 64), (rows, 1, 7), (rows, 1, 130)]
    assert all(close_to_fp32(o, w, x, b) for o, w, b in zip(outputs, weights, biases))


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_products_split_over_any_number_of_threads_give_the_values_of_one(isa, rows):
    """The products cut the weights' rows into one run per thread, and a thread done with its own run takes
    chunks from the back of the others': every row is computed once and exactly, for more threads than
    cores too (where threads join late and their runs are taken by the others)."""
    x = bf16(rows, 1, 520)
    weights = [bf16(n, 520, seed=n) for n in (3001, 70, 1030)]
    ops = kernel_build.compiled_kernels()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ops.linear_bf16(x, weights, [])
        for count in (2, 3, 5, 8):
            torch.set_num_threads(count)
            for _ in range(3):
                assert all(torch.equal(a, b) for a, b in zip(alone, ops.linear_bf16(x, weights, [])))
    finally:
        torch.set_num_threads(threads)
    assert all(close_to_fp32(o, w, x) for o, w in zip(alone, weights))


@needs_kernels
# grouped query heads are attended together (more than 8 per KV head in passes of 8), and split across
# threads when there are fewer (row, KV head) pairs than threads
# (one or two query heads per KV head: keys four at a time, with padding inside a group of four)
@pytest.mark.parametrize("heads,kv_heads,keys,threads", [(4, 4, 1, 2), (8, 2, 37, 2), (6, 3, 300, 2),
                                                         (14, 2, 129, 2), (24, 2, 50, 2), (14, 2, 70, 8),
                                                         (4, 4, 70, 2), (4, 4, 70, 1), (6, 3, 71, 2)])
def test_decode_attention_matches_sdpa_over_a_strided_cache_with_padding(heads, kv_heads, keys, threads):
    cache_k, cache_v = bf16(2, kv_heads, 512, 64, seed=1), bf16(2, kv_heads, 512, 64, seed=2)
    q = bf16(2, 1, heads, 64, seed=3).transpose(1, 2)
    k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]
    mask = torch.ones(2, 1, 1, keys, dtype=torch.bool)
    mask[1, ..., : keys // 3] = False  # left padding of the second row
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel_build.compiled_kernels().decode_attention_bf16(q, k, v, mask, 64 ** -0.5)
    finally:
        torch.set_num_threads(previous)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              enable_gqa=heads != kv_heads)
    assert got.shape == expected.shape
    assert (got.float() - expected).abs().max() < 2e-2


def quantize_linears(model, weights: str) -> None:
    """Swap the decoder layers' linear layers for vlmkit's int8 or 4-bit ones (in place)."""
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is Linear:
                    bias = None if child.bias is None else child.bias.detach()
                    quantized = Int8Linear.from_float(child.weight.float(), bias) if weights == "int8" \
                        else Int4Linear.from_float(child.weight.float(), 64, bias)
                    setattr(parent, name, quantized)


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("model_type,kv_heads", [("llama", 8), ("qwen2", 2)])
def test_one_call_decode_layer_step_computes_what_the_modules_compute(isa, model_type, kv_heads, weights,
                                                                      monkeypatch):
    config = DecoderConfig(vocab_size=100, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=kv_heads, model_type=model_type)
    torch.manual_seed(0)
    with torch.no_grad():
        model = DecoderModel(config)
        for p in model.parameters():
            p.normal_(0, 0.05)
        for layer in model.layers:
            layer.input_layernorm.weight.normal_(1, 0.2)
            layer.post_attention_layernorm.weight.normal_(1, 0.2)
        model = model.bfloat16()
    if weights != "bf16":
        quantize_linears(model, weights)
    assert all(layer.is_plain() for layer in model.layers)
    one_calls = []

    def counted(*args):
        out = cpu_kernels.decoder_layer_step(*args)
        one_calls.append(out is not None)
        return out
    prompt, mask = bf16(2, 9, 256), torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0

    def decode(one_call: bool):
        monkeypatch.setattr("vlmkit.nn.decoder.decoder_layer_step", counted if one_call else lambda *args: None)
        cache = model.new_cache(2, 16)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            model(prompt, positions, mask, cache)
            steps = [model(bf16(2, 1, 256, seed=10 + i), positions[:, -1:] + 1 + i, None, cache) for i in range(3)]
        monkeypatch.undo()
        return torch.stack(steps).float()

    fused = decode(True)
    assert one_calls == [True] * 3 * len(model.layers)  # every step of every layer took the one call
    modules = decode(False)
    # the same bf16 roundings in the same places: equal up to the order of fp32 sums
    assert (fused - modules).abs().max() <= 0.02 * modules.abs().max()


def test_bf16_linear_and_conv_with_many_rows_compute_in_fp32_and_round():
    linear = Linear(64, 48).bfloat16()
    x = bf16(3, 40, 64)
    with torch.no_grad():
        got = linear(x)
        expected = F.linear(x.float(), linear.weight.float(), linear.bias.float()).bfloat16()
    if cpu_kernels.widen_bf16_cpu():
        assert torch.equal(got, expected)
    conv = Conv2d(8, 16, 3, padding=1).bfloat16()
    image = bf16(1, 8, 12, 12)
    with torch.no_grad():
        got = conv(image)
        expected = F.conv2d(image.float(), conv.weight.float(), conv.bias.float(), padding=1).bfloat16()
    if cpu_kernels.widen_bf16_cpu():
        assert torch.equal(got, expected)
    else:  # torch's own bf16 convolution (native bf16 CPUs, kernels off)
        assert torch.equal(got, F.conv2d(image, conv.weight, conv.bias, padding=1))


def test_on_a_cpu_without_native_bf16_many_rows_compute_in_fp32_and_round(monkeypatch):
    """The AVX2-without-bf16 class's prefill and convolution path, run on any CPU by pretending to be one
    (it is plain torch arithmetic in fp32, so it runs wherever torch does)."""
    monkeypatch.setattr(cpu_kernels, "native_bf16", lambda: False)
    monkeypatch.setattr(cpu_kernels, "kernel_isa", lambda: "avx2")
    assert cpu_kernels.widen_bf16_cpu() and cpu_kernels.max_bf16_kernel_rows() == 16
    linear, x = Linear(64, 48).bfloat16(), bf16(3, 40, 64)
    conv, image = Conv2d(8, 16, 3, padding=1).bfloat16(), bf16(1, 8, 12, 12)
    with torch.no_grad():
        assert torch.equal(linear(x), F.linear(x.float(), linear.weight.float(), linear.bias.float()).bfloat16())
        assert torch.equal(conv(image), F.conv2d(image.float(), conv.weight.float(), conv.bias.float(),
                                                 padding=1).bfloat16())


def test_float32_layers_are_exactly_torchs():
    linear, conv = Linear(64, 48), Conv2d(3, 4, 3)
    x, image = torch.randn(2, 5, 64), torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
        assert torch.equal(conv(image), F.conv2d(image, conv.weight, conv.bias))


@pytest.mark.parametrize("rows,outputs,inputs,with_bias", [
    (1, 300, 264, False), (3, 300, 264, True), (6, 300, 264, False), (4, 8, 24, False), (2, 2048, 8, True),
    (5, 13, 4100, False), (17, 33, 100, True), (64, 40, 96, False)])
def test_int8_kernel_matches_the_dequantized_float_product(isa, rows, outputs, inputs, with_bias):
    generator = torch.Generator().manual_seed(rows)
    weight = unaligned(torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8, generator=generator))
    scale = torch.rand(outputs, generator=generator) / 100
    bias = torch.randn(outputs, generator=generator).bfloat16() if with_bias else None
    x = bf16(rows, 1, inputs, seed=rows)
    got = cpu_kernels.linear_int8(x, weight, scale, bias)
    expected = F.linear(x.float(), weight.float() * scale[:, None], None if bias is None else bias.float())
    assert got.shape == (rows, 1, outputs) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)
    x[0, 0, inputs // 2] = float("nan")  # a row that overflowed stays visible, as in a float product
    x[-1, 0, -1] = float("inf") if rows > 1 else float("nan")
    overflowed = cpu_kernels.linear_int8(x, weight, scale, bias)
    assert overflowed[[0, -1]].isnan().all() and torch.equal(overflowed[1:-1], got[1:-1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,outputs,inputs,group,with_bias", [
    (1, 301, 96, 32, True), (1, 7, 512, 128, False), (3, 45, 320, 64, True), (6, 130, 256, 256, False),
    (9, 33, 160, 32, True), (2, 5, 64, 64, False), (5, 3, 192, 64, True), (2, 19, 384, 128, True)])
def test_int4_kernel_matches_the_dequantized_float_product(isa, dtype, rows, outputs, inputs, group, with_bias):
    generator = torch.Generator().manual_seed(rows * outputs)
    values = torch.randint(0, 16, (outputs, inputs), dtype=torch.uint8, generator=generator)
    scale = (torch.rand(outputs, inputs // group, generator=generator) / 100).to(dtype)
    zero = (torch.randn(outputs, inputs // group, generator=generator) / 100).to(dtype)
    bias = torch.randn(outputs, generator=generator).to(dtype) if with_bias else None
    x = torch.randn(rows, 1, inputs, generator=generator).to(dtype)
    got = cpu_kernels.linear_int4(x, pack_nibbles(values), scale, zero, bias)
    weight = (values.float().reshape(outputs, -1, group) - 8) * scale.float()[..., None] + zero.float()[..., None]
    expected = F.linear(x.float(), weight.reshape(outputs, inputs), None if bias is None else bias.float())
    assert got.shape == (rows, 1, outputs) and got.dtype == dtype
    # the kernel rounds each row's activations to int8 per weight group (step: the group's largest |x| /
    # 127), so each output may move by half a step times its weights' magnitudes, plus the rounding of
    # the 16-bit result
    half_step = x.float().abs().reshape(rows, -1, group).amax(-1) / 254
    rounding = half_step @ weight.abs().reshape(outputs, -1, group).sum(-1).T
    limit = rounding[:, None, :] + torch.finfo(dtype).eps * expected.abs() + 1e-5
    assert ((got.float() - expected).abs() <= limit).all()
    x[0, 0, 5] = float("inf")  # a row that overflowed stays visible, as in a float product
    assert cpu_kernels.linear_int4(x, pack_nibbles(values), scale, zero, bias)[0].isnan().all()
    # float32 activations are not rounded to int16: they take the float path
    assert cpu_kernels.linear_int4(x.float(), pack_nibbles(values), scale, zero, bias) is None


@pytest.mark.parametrize("heads,kv_heads,queries,keys,head_dim,causal,padded", [
    (4, 4, 40, 40, 64, True, False), (16, 16, 96, 96, 128, True, False), (8, 2, 37, 50, 128, False, True),
    (14, 2, 100, 100, 64, False, True), (16, 16, 129, 129, 72, False, False), (3, 1, 17, 33, 8, False, False),
    (2, 2, 70, 70, 56, True, False), (2, 1, 20, 70, 56, False, False)])
def test_prefill_attention_matches_sdpa_on_avx512(isa, heads, kv_heads, queries, keys, head_dim, causal, padded):
    """Grouped heads, keys past the queries (a reused prompt prefix), left padding (whole rows masked: zeros,
    as SDPA gives), head sizes with a half-vector tail (after an odd or even count of whole vectors), key
    counts that leave a partial span; the error is the one torch's bf16 SDPA makes."""
    torch.manual_seed(queries)
    q = bf16(2, heads, queries, head_dim, seed=1)
    k, v = bf16(2, kv_heads, keys, head_dim, seed=2), bf16(2, kv_heads, keys, head_dim, seed=3)
    mask = None
    if padded:
        real = torch.ones(2, keys, dtype=torch.bool)
        real[1, :9] = False
        positions, query_positions = torch.arange(keys), torch.arange(keys - queries, keys)
        mask = ((positions[None, :] <= query_positions[:, None])[None] & real[:, None, :])[:, None]
    got = cpu_kernels.prefill_attention(q, k, v, mask, causal)
    if isa != "avx512":
        assert got is None  # the AVX2 products have no prefill attention: torch's SDPA runs
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the blocks of queries may run on any thread, in any order: the same result
        assert torch.equal(cpu_kernels.prefill_attention(q, k, v, mask, causal), got)
    finally:
        torch.set_num_threads(threads)
    options = dict(attn_mask=mask, is_causal=causal and mask is None, enable_gqa=heads != kv_heads)
    exact = torch.nan_to_num(F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options))
    torch_bf16 = F.scaled_dot_product_attention(q, k, v, **options)
    assert got.shape == exact.shape
    assert (got.float() - exact).abs().max() <= 1.5 * (torch_bf16.float() - exact).abs().max() + 1e-3


@needs_kernels
def test_a_large_kv_cache_reuses_the_memory_of_one_that_is_gone():
    """A KV cache above MIN_REUSABLE_BYTES takes the memory of an earlier one once nothing views it any
    more (a prompt cache entry may still view it: then it gets other memory), and never before."""
    head_dim = 64  # one layer, row and head: keys are 2 * head_dim * max_len bytes
    max_len = cpu_kernels.MIN_REUSABLE_BYTES // (2 * head_dim) + 7  # a size no other test allocates
    first = KVCache(1, 1, 1, head_dim, max_len, torch.bfloat16, torch.device("cpu"))
    assert first.keys.shape == (1, 1, 1, max_len, head_dim) and first.keys.dtype == torch.bfloat16
    assert first.keys.is_contiguous() and first.keys.data_ptr() != first.values.data_ptr()
    first.keys.fill_(1.5)
    viewed, freed = first.keys.data_ptr(), first.values.data_ptr()
    kept_view = first.keys[0, 0, 0, :10]
    del first
    second = KVCache(1, 1, 1, head_dim, max_len, torch.bfloat16, torch.device("cpu"))
    assert {second.keys.data_ptr(), second.values.data_ptr()} & {viewed, freed} == {freed}
    assert (kept_view == 1.5).all()
    del kept_view
    third = KVCache(1, 1, 1, head_dim, max_len, torch.bfloat16, torch.device("cpu"))
    assert viewed in {third.keys.data_ptr(), third.values.data_ptr()}
    small = KVCache(1, 1, 1, head_dim, 16, torch.bfloat16, torch.device("cpu"))
    assert small.keys.untyped_storage().nbytes() == 2 * head_dim * 16


@needs_kernels
def test_a_short_request_does_not_hold_a_long_ones_kept_memory():
    """Kept memory goes only to a request at least half its size: a short request holding a long one's block
    would make the next long request map as much again beside it."""
    cpu = torch.device("cpu")
    long_bytes = 13 * cpu_kernels.MIN_REUSABLE_BYTES  # sizes no other test allocates
    long = cpu_kernels.reusable_empty((long_bytes,), torch.uint8, cpu)
    long_memory = long.data_ptr()
    del long
    short = cpu_kernels.reusable_empty((long_bytes // 2 - 4096,), torch.uint8, cpu)
    assert short.data_ptr() != long_memory
    again = cpu_kernels.reusable_empty((11 * cpu_kernels.MIN_REUSABLE_BYTES,), torch.uint8, cpu)
    assert again.data_ptr() == long_memory and again.numel() == 11 * cpu_kernels.MIN_REUSABLE_BYTES


@pytest.mark.parametrize("batch,heads,positions,head_dim,queries", [
    (1, 16, 705, 128, 705), (2, 2, 300, 64, 300), (2, 4, 200, 72, 200), (1, 8, 130, 128, 1), (2, 14, 90, 64, 60),
    (1, 2, 40, 640, 40)])
def test_prefill_rotary_equals_torchs_ops(batch, heads, positions, head_dim, queries):
    """The one-pass rotary (csrc/rotary.cpp) gives exactly what nn.rotary.rotate's torch ops give, for the
    projections' [B, L, H, D] layout seen as [B, H, L, D], a head size whose half is not a multiple of 8, and
    queries that are the last positions only; too few values keep torch's ops."""
    if not (cpu_kernels.kernels_enabled() and HAS_COMPILER):
        pytest.skip("kernels off, no AVX2/FMA CPU or no C++ compiler here")
    x = bf16(batch, queries, heads, head_dim, seed=9).transpose(1, 2)
    position_ids = torch.arange(positions).repeat(batch, 1) + torch.arange(batch)[:, None]
    cos, sin = RotaryEmbedding(head_dim, 10000.0)(position_ids, torch.bfloat16)
    cos, sin = cos[:, -queries:], sin[:, -queries:]
    got = cpu_kernels.rotary(x, cos, sin)
    if x.numel() < cpu_kernels.MIN_PREFILL_KERNEL_VALUES:
        assert got is None
        return
    assert torch.equal(got, rotate(x, cos.unsqueeze(1), sin.unsqueeze(1)))


@pytest.mark.parametrize("shape", [(1, 705, 2048), (3, 50, 896), (4097, 24), (70, 1000)])
def test_prefill_rms_norm_computes_what_the_module_computes(isa, shape):
    """The one-pass C++ RMSNorm (csrc/rms_norm.cpp) against the LLaMA/Qwen2 formula in torch's ops, for
    widths with and without a tail of under 8 or 16: the same bf16 values, except where the sum of squares
    (added in another order) moves a value across a rounding boundary, one bf16 step at most."""
    x, weight = bf16(*shape, seed=4) * 3, bf16(shape[-1], seed=5)
    x[..., 0, :3] = torch.tensor([float("nan"), float("inf"), 0.0])  # a row that overflowed stays visible
    got = cpu_kernels.rms_norm(x, weight, 1e-6)
    hidden = x.float()
    expected = weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    differ = got[finite] != expected[finite]
    assert differ.float().mean() < 1e-3
    one_step = expected[finite].float().abs() * 2 ** -7 + 1e-30
    assert ((got[finite].float() - expected[finite].float()).abs() <= one_step).all()
    norm = RMSNorm(shape[-1]).bfloat16()
    norm.weight.data.copy_(weight)
    with torch.no_grad():
        assert torch.equal(norm(x).isnan(), got.isnan()) and torch.equal(norm(x)[finite], got[finite])


def test_kernel_outputs_round_to_bf16_as_torch_does(isa):
    """The kernels round their fp32 sums to bf16 themselves (torch's conversion would wake its OpenMP
    threads between decode steps): the same bits as torch's rounding, ties to even, NaN, infinities, overflow
    and subnormals included. A zero weight and an fp32 bias make the sums the bias (so no -0.0: 0 + -0 is 0)."""
    ops = kernel_build.compiled_kernels()
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -130 * 3])  # halfway cases
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 3.4e38, -3.4e38, 1e-45])
    bias = torch.cat([ties, special, torch.randn(40037, generator=torch.Generator().manual_seed(7)) * 1e3])
    x, weight = bf16(1, 24), torch.zeros(bias.numel(), 24, dtype=torch.bfloat16)
    got = ops.linear_bf16(x, [weight], [bias])[0][0]
    expected = bias.to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16)[~expected.isnan()], expected.view(torch.int16)[~expected.isnan()])
    assert torch.equal(got.isnan(), expected.isnan())
