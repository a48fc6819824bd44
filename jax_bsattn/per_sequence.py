"""The per-sequence operands, ``kv_lens`` and ``q_offset``, in the form every kernel takes: int32 ``[B]``, clipped.

Both may be traced (a serving cache's lengths, a chunk's offsets). The kernels, forward and backward, CPU and CUDA,
take them as they are (csrc/common/bsattn_common.h ``clipped_key_count``, ``causal_shift`` clip them the same way
again, so an unclipped operand passed to a primitive directly is read safely too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["canonical_kv_lens", "canonical_q_offset"]


def _per_sequence(x, batch: tuple[int, ...], lo: int, hi: int):
    """Integers broadcasting against ``batch`` -> int32 ``[B]`` clipped to ``[lo, hi]``."""
    if not isinstance(x, jax.Array):  # concrete: clipped before jax makes it int32 (2^40 must not wrap to 0)
        arr = np.asarray(x)  # (Python ints past int64: an object array, clipped all the same)
        # (np.asarray: a 0-d object array clips to a bare Python int)
        x = np.asarray(np.clip(arr, lo, hi)).astype(np.int64 if arr.dtype == object else arr.dtype)
    x = jnp.broadcast_to(jnp.asarray(x), batch).reshape(-1)
    x = x.astype(jnp.int32) if x.dtype.itemsize < 4 else x  # (lossless; the bounds may not fit int8 / int16)
    # (clipped in x's own type before int32: an unsigned one takes no negative bound, which would wrap)
    return jnp.clip(x, lo if jnp.issubdtype(x.dtype, jnp.signedinteger) else max(lo, 0), hi).astype(jnp.int32)


def canonical_kv_lens(kv_lens, batch: tuple[int, ...], N: int):
    """``kv_lens`` broadcast to ``batch`` -> int32 ``[B]`` clipped to ``[0, N]``."""
    return _per_sequence(kv_lens, batch, 0, N)


def canonical_q_offset(q_offset, batch: tuple[int, ...], M: int, N: int):
    """``q_offset`` broadcast to ``batch`` -> int32 ``[B]`` clipped to ``[-M, N - 1]`` (past either end every row sees
    all keys, or none: the same mask), as the kernels clip it (common/bsattn_common.h causal_shift)."""
    return _per_sequence(q_offset, batch, -M, N - 1)
