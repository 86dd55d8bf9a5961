"""Argument checking and the canonical (outer, C, inner) view.

Every public function goes through these helpers, so a bad argument always gets the same kind of
message: the argument's name, what was expected, and what was given.  Copies happen here, in plain
sight (``np.ascontiguousarray``), never inside the compiled module.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any

import numpy as np
from numpy.exceptions import AxisError
from numpy.typing import NDArray

# The dtypes of statistics and running buffers (and of data, with the 16-bit ones below).
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
F64 = np.dtype(np.float64)
F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
DATA_DTYPES_TEXT = "a float16, bfloat16, float32 or float64 array"


def bfloat16_dtype() -> np.dtype[Any] | None:
    """ml_dtypes' bfloat16, if ml_dtypes is loaded (an array of it can only exist if it is; bnkernel
    itself never imports it)."""
    mod = sys.modules.get("ml_dtypes")
    return None if mod is None else np.dtype(mod.bfloat16)


def is_data_dtype(dtype: np.dtype[Any]) -> bool:
    """Whether the kernels take data of this dtype: float32, float64, float16, bfloat16."""
    if dtype in SUPPORTED_DTYPES or dtype == F16:
        return True
    return dtype.itemsize == 2 and dtype.kind == "V" and dtype == bfloat16_dtype()


def param_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype of gamma, beta, the running statistics and dgamma / dbeta for data of `dtype`:
    the same, or float32 for the 16-bit types (their statistics and arithmetic are wider still)."""
    return F32 if dtype.itemsize == 2 else dtype


def param_dtype_text(dtype: np.dtype[Any]) -> str:
    """How a parameter's expected dtype is explained in an error message."""
    if dtype.itemsize == 2:
        return f"float32 (parameters of {dtype.name} data are float32)"
    return f"{dtype} (the dtype of x)"


def as_input(x: Any, name: str, *, allow_empty: bool = False) -> NDArray[Any]:
    """x as an ndarray of a supported float dtype with ndim >= 2 (not copied unless it must be)."""
    arr = x if type(x) is np.ndarray else np.asarray(x)
    if arr.dtype not in SUPPORTED_DTYPES and not is_data_dtype(arr.dtype):
        raise TypeError(f"{name}: expected {DATA_DTYPES_TEXT}, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(
            f"{name}: expected an array with ndim >= 2 (batch, channels, ...), "
            f"got ndim {arr.ndim} with shape {arr.shape}"
        )
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name}: expected a non-empty array, got shape {arr.shape}")
    return arr


def channel_axis(ndim: int, axis: Any) -> int:
    """The channel axis normalized to 0 <= axis < ndim."""
    if type(axis) is not int:  # fast path first: this runs on every call
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
    a = int(axis)
    if not -ndim <= a < ndim:
        raise AxisError(a, ndim, "axis: channel axis out of range")
    return a % ndim


def view3(x: NDArray[Any], axis: int) -> NDArray[Any]:
    """C-contiguous (outer, C, inner) view of x; copies only when x is not C-contiguous."""
    shape = x.shape
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)  # the one explicit copy: kernels need C order
    return x.reshape(outer, shape[axis], inner)


def check_channels(x: NDArray[Any], axis: int, name: str = "x") -> int:
    c = x.shape[axis]
    if c == 0:
        raise ValueError(f"{name}: the channel axis {axis} has length 0 (shape {x.shape})")
    return int(c)


def check_same_shape(a: NDArray[Any], x: NDArray[Any], name: str, x_name: str = "x") -> None:
    if a.shape != x.shape:
        raise ValueError(f"{name}: expected the shape of {x_name} {x.shape}, got {a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of {x_name}), got {a.dtype}")


def channel_param(v: Any, name: str, channels: int, dtype: np.dtype[Any]) -> NDArray[Any] | None:
    """A read-only per-channel array (gamma, beta): 1-d, length C, exactly the parameter dtype of
    data of `dtype` (see param_dtype)."""
    if v is None:
        return None
    arr = v if type(v) is np.ndarray else np.asarray(v)
    if arr.dtype != param_dtype(dtype):
        raise TypeError(f"{name}: expected dtype {param_dtype_text(dtype)}, got {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != channels:
        raise ValueError(f"{name}: expected shape ({channels},), got {arr.shape}")
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


def running_buffer(v: Any, name: str, channels: int, dtype: np.dtype[Any]) -> NDArray[Any] | None:
    """A per-channel array updated in place (running statistics, of the parameter dtype of data of
    `dtype`): it must already be exactly right, since a copy would silently drop the update."""
    if v is None:
        return None
    if not isinstance(v, np.ndarray):
        raise TypeError(
            f"{name}: expected a numpy array (it is updated in place), got {type(v).__name__}"
        )
    if v.dtype != param_dtype(dtype):
        raise TypeError(f"{name}: expected dtype {param_dtype_text(dtype)}, got {v.dtype}")
    if v.ndim != 1 or v.shape[0] != channels:
        raise ValueError(f"{name}: expected shape ({channels},), got {v.shape}")
    if not v.flags.c_contiguous:
        raise ValueError(f"{name}: must be contiguous (it is updated in place)")
    if not v.flags.writeable:
        raise ValueError(f"{name}: is read-only (it is updated in place)")
    return v


def saved_stat(v: Any, name: str, channels: int) -> NDArray[np.float64]:
    """Per-channel statistics (mean, invstd, sums): 1-d, length C, float32 or float64; passed to the
    kernels as float64."""
    if v is None:
        raise TypeError(f"{name}: required, got None")
    arr = np.asarray(v)
    if arr.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != channels:
        raise ValueError(f"{name}: expected shape ({channels},), got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=F64)


def same_array(a: NDArray[Any], b: NDArray[Any]) -> bool:
    """Whether a and b are views of exactly the same elements (same memory, shape and strides)."""
    return (
        a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def output(
    out: Any,
    name: str,
    like: NDArray[Any],
    inputs: tuple[NDArray[Any] | None, ...],
    *,
    in_place: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """The array a kernel writes into: a fresh one, or the user's ``out=`` if it is exactly right
    (shape, dtype, C-contiguous, writeable, sharing no memory with an input).  With ``in_place``,
    ``out`` may also be that very array (the same elements, not a partial overlap): the kernels
    that allow it read each value before writing it and never read it again."""
    if out is None:
        return np.empty(like.shape, dtype=like.dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(f"{name}: expected shape {like.shape}, got {out.shape}")
    if out.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype}, got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (a copy would drop the writes)")
    if not out.flags.writeable:
        raise ValueError(f"{name}: is read-only")
    if in_place is not None and same_array(out, in_place):
        inputs = tuple(a for a in inputs if a is not in_place)
    for a in inputs:
        if a is not None and np.may_share_memory(out, a) and np.shares_memory(out, a):
            raise ValueError(f"{name}: overlaps an input array; pass a separate buffer")
    return out


def real_number(v: Any, name: str, *, minimum: float | None = None) -> float:
    if type(v) is not float and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {f}")
    if minimum is not None and f < minimum:
        raise ValueError(f"{name}: expected a number >= {minimum}, got {f}")
    return f
