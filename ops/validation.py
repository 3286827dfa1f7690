"""Argument checks and the exception types shared by the ops (and usable by the networks built on them).

Every failure names the argument and what was expected against what was given (its shape, dtype,
device or value), as docs/architecture.md §3 asks. One exception type per kind of mistake, each a
subclass of :class:`OpError` and of the built-in type the ops raised before these existed, so
``except ValueError`` keeps working:

* :class:`OpShapeError` (ValueError): a tensor of the wrong rank or shape.
* :class:`OpDtypeError` (ValueError and TypeError): a tensor of the wrong dtype, or not the dtype of
  its partner tensors or of the module's parameters.
* :class:`OpDeviceError` (ValueError): tensors on different devices.
* :class:`OpArgumentError` (ValueError): a non-tensor argument of the wrong value (kernel_size,
  n_iter, a choice among names); of the wrong type (a float for an int, an int for a flag, a
  non-tensor where a tensor is due) it is :class:`OpArgumentTypeError`, also a TypeError.
* :class:`BackendError` (ValueError): an unknown backend, or one that cannot run these tensors
  ("cupy" on CPU tensors, "emulated" outside :func:`ops.kernel_host_emulation`).
* :class:`BackendUnavailableError` (BackendError and RuntimeError): the backend's software is
  missing (CuPy, or a C++ compiler for host emulation).

Kept free of op-specific knowledge, and a leaf of the package (it imports nothing from ``ops``), so
every op and network can use it. Backend names and the backend rule live in :mod:`ops.backends`.
"""

from __future__ import annotations

import torch


class OpError(Exception):
    """Base of every argument error the ops raise."""


class OpShapeError(OpError, ValueError):
    """A tensor argument has the wrong number of dimensions or the wrong shape."""


class OpDtypeError(OpError, ValueError, TypeError):
    """A tensor argument has a dtype the op does not take (or not the dtype of its partner tensors or
    of the module's parameters)."""


class OpDeviceError(OpError, ValueError):
    """Tensor arguments are on different devices, or on one the chosen path cannot run on."""


class OpArgumentError(OpError, ValueError):
    """A non-tensor argument (an int, a bool, a choice among names) has the wrong type or value, or
    something that is not a tensor was passed for a tensor."""


class OpArgumentTypeError(OpArgumentError, TypeError):
    """A non-tensor argument has the wrong type (a float or a bool for an int, an int for a bool), or
    something that is not a tensor was passed for a tensor."""


class BackendError(OpError, ValueError):
    """``backend`` is not a known name, or the named backend cannot run these tensors."""


class BackendUnavailableError(BackendError, RuntimeError):
    """The backend needs software this environment lacks (CuPy for "cupy", a C++ compiler for the
    kernels' host emulation)."""


#: Floating dtypes every op accepts (the CUDA kernels are instantiated for exactly these).
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, *, ndim: int, layout: str) -> torch.Tensor:
    """``t`` must be a floating tensor with ``ndim`` dimensions; ``layout`` (e.g. "[B,C,H,W]") goes in
    the message."""
    if not isinstance(t, torch.Tensor):
        raise OpArgumentTypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise OpShapeError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise OpDtypeError(f"{name} must have a floating dtype ({allowed}), got {t.dtype} (shape {tuple(t.shape)})")
    return t


def check_same_dtype_device(**tensors: torch.Tensor) -> None:
    """All ``tensors`` (given by argument name) share the first one's dtype and device."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise OpDtypeError(f"{name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}")
        if t.device != first.device:
            raise OpDeviceError(f"{name} must be on the device of {first_name} ({first.device}), got {t.device}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    """``t.shape`` must equal ``expected``; ``layout`` names the dimensions in the message."""
    if tuple(t.shape) != tuple(expected):
        raise OpShapeError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(t.shape)}")


def check_int(name: str, value: object, *, minimum: int, odd: bool = False) -> int:
    """``value`` must be an int (not bool) >= ``minimum`` (and odd when ``odd``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OpArgumentTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise OpArgumentError(f"{name} must be >= {minimum}, got {value}")
    if odd and value % 2 == 0:
        raise OpArgumentError(f"{name} must be odd (a centred window), got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise OpArgumentTypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value: object, choices: tuple[object, ...]) -> object:
    """``value`` must be one of ``choices`` (a bool never counts as the int it equals)."""
    if isinstance(value, bool) or value not in choices:
        raise OpArgumentError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype for ``device_type`` when autocast is on there, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


#: The dtypes autocast casts between (a float64 input or module is left alone by it).
_AUTOCAST_TYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_input_dtype(name: str, x: torch.Tensor, param_dtype: torch.dtype, *, module: str) -> None:
    """``x`` (argument ``name`` of ``module``) must have the module's parameter dtype, unless
    ``torch.autocast`` is on for x's device and either x has the autocast dtype (what the
    convolutions before the module return there) or both dtypes are ones autocast casts (the module's
    convolutions then cast themselves). A clear :class:`OpDtypeError` instead of a raw convolution
    error, or a silent cast of the parameters, on a mismatch.
    """
    if x.dtype == param_dtype:
        return
    autocast = _autocast_dtype(x.device.type)
    if autocast is not None and (
        x.dtype == autocast or (x.dtype in _AUTOCAST_TYPES and param_dtype in _AUTOCAST_TYPES)
    ):
        return
    raise OpDtypeError(
        f"{name} has dtype {x.dtype} but the {module}'s parameters are {param_dtype}: convert the module "
        f"(.to({x.dtype})) or the input (.to({param_dtype})), or run under torch.autocast"
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops accumulate in: float64 stays float64; float32, float16 and bfloat16 use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
