"""Where a model goes: one device from transformers' ``device_map`` / ``device`` arguments."""

import torch

from ..errors import InputError

# transformers' device_map strategies for spreading a model over the GPUs; vlmkit places a model on one
# device, so each means what "auto" means (and on a machine with only the CPU, all of transformers' do too)
ONE_DEVICE_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_CHOICES = "'auto', 'cpu', 'cuda', 'cuda:N', a CUDA device number N, or {'': one of these}"


def resolve_device(device_map=None, device=None) -> torch.device:
    """One device from transformers-style ``device_map`` ("auto", "balanced", "sequential", "balanced_low_0",
    "cpu", "cuda:0", 0, {"": dev}) or ``device``; neither given: the CPU, as transformers ("auto": CUDA when
    there is one). Anything else, or a CUDA device this machine lacks, is an ``InputError`` naming the option."""
    option, given = ("device", device) if device is not None else ("device_map", device_map)
    choice = given
    if isinstance(choice, dict):
        targets = {str(v) if isinstance(v, torch.device) else v if isinstance(v, (str, int)) else repr(v)
                   for v in choice.values()}
        if len(targets) != 1:
            raise InputError(f"device_map spreads the model over {sorted(map(str, targets))}; vlmkit places a "
                             f"model on one device: pass device_map='auto', 'cpu' or 'cuda:N'")
        choice = targets.pop()
    if choice is None:
        return torch.device("cpu")
    if isinstance(choice, str) and choice in ONE_DEVICE_STRATEGIES:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = None
    if isinstance(choice, int) and not isinstance(choice, bool) and choice >= 0:
        device = torch.device("cuda", choice)  # transformers' number: a CUDA device
    elif isinstance(choice, (str, torch.device)):
        try:
            device = torch.device(choice)
        except RuntimeError:
            pass
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"{option}={given!r} is not a device vlmkit can load onto; it takes {DEVICE_CHOICES}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise InputError(f"{option}={given!r} asks for CUDA device {device.index or 0}, but torch sees no CUDA "
                             f"device here; pass {option}='cpu' (or 'auto', which picks CUDA only where there is one)")
        if (device.index or 0) >= count:
            raise InputError(f"{option}={given!r} asks for CUDA device {device.index}, but torch sees {count} "
                             f"(cuda:0..cuda:{count - 1}); pick one of those")
    return device
