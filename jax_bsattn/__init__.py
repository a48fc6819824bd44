"""jax_bsattn: block-sparse (BSR) attention for JAX, with CPU and CUDA kernels behind the XLA FFI."""

from .attention import block_sparse_attention
from .checks import check_layout, validate_layout
from .exporting import export
from .layout import BlockSparseLayout
from . import layouts
from . import reference
from . import zigzag

# (not "flax": `from jax_bsattn import *` would import flax, which `import jax_bsattn` does not need)
__all__ = ["BlockSparseLayout", "block_sparse_attention", "check_layout", "export", "validate_layout", "layouts",
           "reference", "zigzag"]
__version__ = "0.1.0"


def __getattr__(name):
    # `jax_bsattn.flax` needs flax: imported on first use, so that `import jax_bsattn` does not.
    if name == "flax":
        import importlib
        return importlib.import_module(".flax", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
