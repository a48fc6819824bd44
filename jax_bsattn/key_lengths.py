"""Per-sequence key lengths (``kv_lens``) under differentiation: keys at or past a batch element's length take no part.

The forward's kernels take the lengths themselves (``attention._attention_kv_lens``: one kernel call); the backward's
know one key length, N, for the whole batch. A serving cache is longer than most of its sequences, and its last block
is often partly written, so where gradients are taken ``kv_lens`` is served around the kernels:

- the blocks wholly at or past a sequence's length leave its layout (their entries become -1: out of range, skipped
  by every kernel, so the cache past the length is never read, whatever it holds);
- the one block column the length cuts through (the cut column, where ``kv_len % C != 0``) leaves it too, and its
  keys below the length are attended to here, in XLA, by the query rows whose block row lists it;
- the two parts merge by their log-sum-exps (o rounded once more to q's dtype: the cut rows' o are at most half an
  ulp further from the float32 result than the kernels' alone).

The extra work is one block column per sequence, O(M Hq C D), and the layout becomes per batch element ([B, LH, nnz]
int32). Gradients flow through both parts (the kernels' backward takes the merge's lse cotangent).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .listed import attention_over_listed

__all__ = ["canonical_kv_lens", "canonical_q_offset", "cut_layout", "cut_column_attention", "merge_by_lse"]


def _per_sequence(x, batch: tuple[int, ...], lo: int, hi: int):
    """Integers broadcasting against ``batch`` -> int32 ``[B]`` clipped to ``[lo, hi]``."""
    if not isinstance(x, jax.Array):  # concrete: clipped before jax makes it int32 (2^40 must not wrap to 0)
        arr = np.asarray(x)  # (Python ints past int64: an object array, clipped all the same)
        x = np.clip(arr, lo, hi).astype(np.int64 if arr.dtype == object else arr.dtype)
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


def cut_layout(indptr, indices, lens, C: int):
    """The canonical layout ``indptr [LB, LH, MB + 1]`` (monotone), ``indices [LB, LH, nnz]`` cut at ``lens [B]``.

    Returns ``indptr, indices`` per batch element (``[B, LH, ...]``) without the blocks at or past each length, the
    cut column per element (``[B]``, -1 where the length is a multiple of C) and, per block row, how many times the
    layout lists it (``[B, LH, MB]``: a block listed twice counts twice, as in the kernels).
    """
    B = lens.shape[0]
    indptr = jnp.broadcast_to(indptr, (B,) + indptr.shape[1:])
    indices = jnp.broadcast_to(indices, (B,) + indices.shape[1:])
    whole = (lens // C)[:, None, None]  # block columns wholly below the length
    cut = jnp.where(lens % C != 0, lens // C, -1)
    kept = jnp.where(indices < whole, indices, -1)  # (a negative column stays out of range)
    # times each block row lists the cut column: a running count over the entries, read at the rows' bounds
    hits = (indices == cut[:, None, None]) & (cut >= 0)[:, None, None]
    running = jnp.cumsum(hits.astype(jnp.int32), axis=-1)
    running = jnp.concatenate([jnp.zeros_like(running[..., :1]), running], axis=-1)  # (zeros sharded like hits)
    counts = (jnp.take_along_axis(running, indptr[..., 1:], axis=-1)
              - jnp.take_along_axis(running, indptr[..., :-1], axis=-1))
    return indptr, kept, cut, counts


def cut_column_attention(q, k, v, lens, cut, counts, shift, *, R: int, C: int, scale: float,
                         softcap: float, causal: bool):
    """Attention of ``q [B, M, Hq, D]`` over the cut column's keys below ``lens``, for the rows whose block row lists
    it (``counts [B, LH, MB]`` times), in float32 with the kernels' masking (causal: key j seen by row i when
    ``j <= i + shift[b]``, ``shift [B]`` the canonical q_offset): ``o [B, M, Hq, D]`` (normalised over these keys) and
    ``lse [B, M, Hq]`` (-inf where a row sees none of them)."""
    B, M, Hq, D = q.shape
    N, Hk = k.shape[1], k.shape[2]
    g = Hq // Hk
    j = cut[:, None] * C + jnp.arange(C)[None, :]  # [B, C] key positions
    key_ok = (cut[:, None] >= 0) & (j < lens[:, None])
    at = jnp.clip(j, 0, N - 1)[:, :, None, None]

    def column(x):  # [B, Hk, 1, C, D] float32; 0 past the length (the cache there may hold anything)
        x = jnp.take_along_axis(x, at, axis=1).astype(jnp.float32)
        x = jnp.where(key_ok[:, :, None, None], x, jnp.zeros_like(x))
        return jnp.swapaxes(x, 1, 2)[:, :, None]

    kc, vc = column(k), column(v)
    qh = jnp.moveaxis(q.reshape(B, M, Hk, g, D), 1, 3).astype(jnp.float32)  # [B, Hk, g, M, D]
    row_block = jnp.arange(M) // R
    listed_times = jnp.broadcast_to(counts[:, :, row_block], (B, Hk, M))  # (a layout shared by the KV heads: LH = 1)
    row_lists = listed_times > 0  # [B, Hk, M]
    weights = listed_times[..., None].astype(jnp.float32) * key_ok[:, None, None, :]  # [B, Hk, M, C]
    if causal:
        i = jnp.arange(M)[:, None] + shift[:, None, None, None]  # [B, 1, M, 1]: row i's last key
        weights = jnp.where(j[:, None, None, :] <= i, weights, 0.0)
        # (the kernels skip a block that no row of its block row sees)
        last_row_of_block_row = jnp.minimum(row_block * R + R, M) - 1
        row_lists = row_lists & (cut[:, None, None] * C <= last_row_of_block_row + shift[:, None, None])
    # Plain products (no custom VJP, no lax.cond): a row that lists the column takes all of its C keys (those past the
    # length are zeros), as the kernels take a listed block, 0 x inf included; a row that does not has q = 0 here
    # and weight 0 throughout, so it comes out empty (o = 0) and its gradients (and the keys' from it) are 0 even
    # where k or q holds an inf. (Left: a row that lists the column but whose causal mask hides all its keys is empty
    # here, so an inf in v there does not reach its o as the reference's 0 x inf does when the row sees other keys.)
    qh = jnp.where(row_lists[:, :, None, :, None], qh, jnp.zeros_like(qh))
    o, lse = attention_over_listed(qh, kc, vc, weights[:, :, None], scale, softcap)
    o = jnp.moveaxis(o.reshape(B, Hq, M, D), 1, 2)  # [B, M, Hq, D]
    lse = jnp.swapaxes(lse[..., 0].reshape(B, Hq, M), 1, 2)  # ([B, Hk, g, M, 1]: squeezed first, as explicit
    # sharding's reshape rule takes a merge of dims but not a merge and a squeeze at once)
    return o, lse


def merge_by_lse(o1, lse1, o2, lse2):
    """Two attentions over disjoint key sets -> the attention over their union: ``o`` in o1's dtype, float32 lse.
    A row empty in one part takes the other's (exactly: its weight is 1); empty in both, o = 0 and lse = -inf; a NaN
    lse makes the row NaN. Written so that no gradient meets exp(-inf - -inf)."""
    top = jax.lax.stop_gradient(jnp.maximum(lse1, lse2))  # (its gradient cancels exactly)
    base = jnp.where(top == -jnp.inf, jnp.zeros_like(top), top)
    e1, e2 = jnp.exp(lse1 - base), jnp.exp(lse2 - base)
    total = e1 + e2
    ok, empty = total > 0, total == 0
    safe = jnp.where(ok, total, jnp.ones_like(total))
    lse = jnp.where(ok, base + jnp.log(safe), jnp.where(empty, -jnp.inf, jnp.nan))
    part2 = (e2 / safe)[..., None] * o2
    o = (e1 / safe)[..., None] * o1.astype(jnp.float32) + jnp.where((e2 > 0)[..., None], part2, jnp.zeros_like(part2))
    o = jnp.where(ok[..., None], o, jnp.where(empty[..., None], jnp.zeros_like(o), jnp.full_like(o, jnp.nan)))
    return o.astype(o1.dtype), lse
