"""The settings of ``vlmkit.LLM`` that are not ``vlmkit serve``'s: vLLM's own ``LLM`` arguments, taken where
vlmkit can honour them and refused, by name, where it cannot; and the load options (dtype, device,
quantize) checked before the weights are read, in ``LLM``'s own parameter names."""

from __future__ import annotations

from ..errors import InputError

# vLLM's LLM arguments that vlmkit takes; what each does here is in ``vllm_settings``
VLLM_SETTINGS = ("seed", "limit_mm_per_prompt", "tensor_parallel_size", "trust_remote_code", "max_model_len")
_MM_LIMITS = {"image": "max_images"}


def vllm_settings(settings: dict, limits):
    """Take vLLM's arguments out of ``settings``; return (the default seed, ``limits`` with
    ``limit_mm_per_prompt`` folded in). ``seed`` seeds every prompt whose sampling params give none;
    ``trust_remote_code`` means nothing (vlmkit runs only its own model code); ``tensor_parallel_size`` must
    be 1 and ``max_model_len`` left out or the model's own, since vlmkit runs one device at the model's context."""
    seed = settings.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise InputError(f"seed must be a whole number from 0 to 2**63 - 1 (or None), got {seed!r}")
    if not isinstance(settings.pop("trust_remote_code", False), bool):
        raise InputError("trust_remote_code must be True or False (vlmkit runs only its own model code either way)")
    size = settings.pop("tensor_parallel_size", 1)
    if size != 1 or isinstance(size, bool):
        raise InputError(f"tensor_parallel_size={size!r}: vlmkit runs a model on one device; leave it out or give 1 "
                         f"(for more throughput run more replicas: vlmkit batch --ray --replicas N)")
    length = settings.pop("max_model_len", None)
    if length is not None:
        raise InputError(f"max_model_len={length!r}: vlmkit always uses the model's own context "
                         f"(max_position_embeddings in its config.json); leave max_model_len out")
    return seed, _with_mm_limit(limits, settings.pop("limit_mm_per_prompt", None))


def _with_mm_limit(limits, per_prompt):
    """``limits`` (None, a dict or ``ServeLimits``) with vLLM's ``limit_mm_per_prompt={"image": N}`` as
    ``max_images``."""
    if per_prompt is None:
        return limits
    if not isinstance(per_prompt, dict) or set(per_prompt) - set(_MM_LIMITS):
        raise InputError(f"limit_mm_per_prompt takes {{'image': N}} (vlmkit's limits={{'max_images': N}}), got "
                         f"{per_prompt!r:.80}")
    if limits is not None and not isinstance(limits, dict):
        from dataclasses import asdict
        limits = asdict(limits)
    return {**(limits or {}), **{_MM_LIMITS[kind]: n for kind, n in per_prompt.items()}}


def check_load_options(dtype, device, quantize) -> None:
    """Check what ``Engine.load`` would refuse only after finding the checkpoint, with its messages in
    ``LLM``'s names (``quantize=``, ``device=``) rather than transformers' that ``Engine.load`` speaks."""
    from ..io.checkpoint import resolve_dtype
    from ..models.devices import resolve_device
    from ..quant.config import parse_quantization_config

    try:
        if dtype not in (None, "auto"):
            resolve_dtype(dtype, {})
        resolve_device(device_map=device or "auto")
        parse_quantization_config(quantize)
    except InputError as err:
        message = str(err).replace("quantization_config", "quantize").replace("device_map", "device")
        raise InputError(message) from None
