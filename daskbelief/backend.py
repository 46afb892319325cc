"""Array backends: the same network and update code runs on NumPy and on CuPy arrays.

Code asks the array it was given for its namespace instead of importing numpy directly, so a
worker with a GPU computes on the GPU without a second code path.
"""
from __future__ import annotations

import numpy as np


def namespace(*arrays):
    """The array module (numpy or cupy) that owns ``arrays``; numpy when none is a CuPy array."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def axpy(alpha: float, x, y) -> None:
    """``y += alpha * x`` in place, in one pass and without a temporary.

    On NumPy float arrays that are contiguous this is BLAS ``axpy`` (SciPy's wrapper; SciPy
    comes with scikit-learn), about twice as fast as ``y += alpha * x``, which allocates
    ``alpha * x`` and makes two more passes over memory. Anything else falls back to that.
    """
    kind = {np.float32: "saxpy", np.float64: "daxpy"}.get(y.dtype.type)
    if (kind is None or namespace(x, y) is not np or x.dtype != y.dtype
            or not (x.flags.c_contiguous and y.flags.c_contiguous)):
        y += alpha * x
        return
    from scipy.linalg import blas

    getattr(blas, kind)(x.reshape(-1), y.reshape(-1), a=alpha)


def unaligned(x) -> bool:
    """Whether ``x`` is a NumPy array whose start is not a multiple of its item size.

    An array received over TCP starts wherever its frame fell in the message distributed read,
    often at an odd byte, and NumPy's loops and BLAS take slow paths on such arrays (a locally
    connected layer's forward 9% slower, Adagrad 1.2x, a dot product 25x): one copy costs less.
    """
    return isinstance(x, np.ndarray) and not x.flags.aligned


def aligned(x):
    """``x``, or an aligned copy of it when it is ``unaligned``."""
    return x.copy() if unaligned(x) else x


def all_finite(x) -> bool:
    """Whether every value of the 1-D array ``x`` is finite, in one BLAS pass instead of two.

    A NaN or an infinity makes ``x . x`` non-finite; finite values make it finite unless their
    squares overflow (an rms above ~1e19 / sqrt(len)), and only then is every value looked at
    (``isfinite``, a pass that also writes a boolean array). A parameter shard checks every push
    it receives this way before applying it.
    """
    if unaligned(x):  # BLAS would fall back to a loop 25x slower
        return bool(np.isfinite(x).all())
    xp = namespace(x)
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is what is being asked
        square = xp.dot(x, x)
    return bool(xp.isfinite(square)) or bool(xp.isfinite(x).all())


def to_host(src, dst: np.ndarray) -> None:
    """Copy ``src`` (NumPy or CuPy) into the host array ``dst`` without a temporary."""
    if type(src).__module__.startswith("cupy"):
        src.get(out=dst)
    else:
        dst[...] = src


def to_device(src: np.ndarray, dst) -> None:
    """Copy the host array ``src`` into ``dst`` (NumPy or CuPy) without a temporary."""
    if type(dst).__module__.startswith("cupy"):
        dst.set(src)
    else:
        dst[...] = src


def to_numpy(a) -> np.ndarray:
    """A host (NumPy) copy of ``a``; ``a`` itself when it already is one."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_backend(name: str):
    """The array module called ``name`` ("numpy" or "cupy"), with a clear error when unusable."""
    if name == "numpy":
        return np
    if name == "cupy":
        if not gpu_available():
            raise RuntimeError("backend 'cupy' was asked for but CuPy or a CUDA device is not available "
                               "(install the 'gpu' extra on a machine with an NVIDIA GPU)")
        import cupy

        return cupy
    raise ValueError(f"unknown array backend {name!r}: expected 'numpy' or 'cupy'")
