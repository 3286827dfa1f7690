"""Argument checks shared by the ops: every failure is a ValueError naming the argument and what was
expected (its shape, dtype or device), as docs/architecture.md's contract asks.

Kept free of op-specific knowledge so other ops (e.g. the TV-L1 flow layer) can reuse them.
"""

from __future__ import annotations

import torch

from .kernel_loader import BACKENDS, check_backend  # noqa: F401  (re-exported for the SIFA modules)

#: Floating dtypes every op accepts (the CUDA kernels are instantiated for exactly these).
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, *, ndim: int, layout: str) -> torch.Tensor:
    """``t`` must be a floating tensor with ``ndim`` dimensions; ``layout`` (e.g. "[B,C,H,W]") goes in
    the message."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise ValueError(f"{name} must have a floating dtype ({allowed}), got {t.dtype} (shape {tuple(t.shape)})")
    return t


def check_same_dtype_device(**tensors: torch.Tensor) -> None:
    """All ``tensors`` (given by argument name) share the first one's dtype and device."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise ValueError(f"{name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} must be on the device of {first_name} ({first.device}), got {t.device}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    """``t.shape`` must equal ``expected``; ``layout`` names the dimensions in the message."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(t.shape)}")


def check_int(name: str, value: object, *, minimum: int, odd: bool = False) -> int:
    """``value`` must be an int (not bool) >= ``minimum`` (and odd when ``odd``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name} must be odd (a centred window), got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one query per device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def check_input_dtype(name: str, x: torch.Tensor, parameter: torch.Tensor) -> None:
    """``x`` must have the dtype of a module's ``parameter``, unless autocast is on for ``x``'s device and
    both dtypes are ones autocast casts (then the module's convs cast themselves)."""
    if x.dtype == parameter.dtype:
        return
    autocast_types = (torch.float16, torch.bfloat16, torch.float32)
    if _autocast_enabled(x.device.type) and x.dtype in autocast_types and parameter.dtype in autocast_types:
        return
    raise ValueError(
        f"{name} has dtype {x.dtype} but the module's parameters are {parameter.dtype}: convert one to the "
        f"other (e.g. module.to({x.dtype})) or run under torch.autocast"
    )
