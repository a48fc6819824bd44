"""Loads the compiled nanobind modules and registers their FFI targets with XLA."""

from __future__ import annotations

import jax

try:
    from . import _bsattn_cpu
except ImportError as e:  # pragma: no cover - a source checkout that was never built
    raise ImportError(
        "jax_bsattn's compiled CPU module (_bsattn_cpu) is missing: install the package with "
        "`pip install .` (it builds the extension) rather than importing the source tree") from e

try:
    from . import _bsattn_cuda
except ImportError:
    _bsattn_cuda = None

CPU_TARGETS = frozenset(_bsattn_cpu.registrations())
CUDA_TARGETS = frozenset(_bsattn_cuda.registrations()) if _bsattn_cuda is not None else frozenset()

for _name, _capsule in _bsattn_cpu.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
if _bsattn_cuda is not None:
    # On a jaxlib without the CUDA plugin this is queued, not an error.
    for _name, _capsule in _bsattn_cuda.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")


def cuda_available() -> bool:
    """True when the CUDA module was built (it runs only where jax sees a CUDA GPU)."""
    return _bsattn_cuda is not None


def sm90_kernels() -> bool:
    """True when the CUDA module holds the Hopper (sm_90a) kernels: built with compute capability 90 among
    BSATTN_CUDA_ARCHS. Without them an H100 / H200 runs the portable kernels, which take no Hopper workspace."""
    # (a module built before the query existed: treat as without them)
    return _bsattn_cuda is not None and bool(getattr(_bsattn_cuda, "sm90_kernels", lambda: False)())
