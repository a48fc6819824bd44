"""Builders of common block-sparse layouts.

Every builder takes ``(seq_lens, block_size, ...)`` first -- each an int (square) or a pair ``(M, N)`` /
``(R, C)`` -- and returns a :class:`~jax_bsattn.BlockSparseLayout`. Patterns are defined on *tokens* and
a block is listed when at least one of its elements is wanted, so the layouts are exact for any block size,
``M != N`` and lengths that are not multiples of the block size. Distances are measured from the
bottom-right aligned diagonal, as the op's ``causal`` flag: element ``(i, j)`` has ``d = i + (N - M) - j``.

A layout lists whole blocks: for an element-exact causal mask pass ``causal=True`` to the attention too.

Concrete layouts are built with NumPy without ever forming an ``M x N`` mask (at most ``MB x NB``; the band
builders work on block-column ranges, in O(nnz)). :func:`from_topk` builds a layout inside ``jit`` from
traced scores (MoBA / NSA-style routing); :func:`union` and :func:`intersection` accept traced layouts too.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .layout import BlockSparseLayout, _block_counts_numpy, _check_pair, _integer, _is_traced, _nnz, static_flag

__all__ = ["block_causal", "sliding_window", "strided", "global_local", "random", "per_head", "union",
           "intersection", "from_topk"]


# ---- geometry -------------------------------------------------------------------------------------

class _Grid:
    """Token extents of the block rows and columns and the diagonal offset of one problem."""

    def __init__(self, seq_lens, block_size):
        self.seq_lens = (M, N) = _check_pair("seq_lens", seq_lens)
        self.block_size = (R, C) = _check_pair("block_size", block_size)
        self.MB, self.NB = math.ceil(M / R), math.ceil(N / C)
        self.offset = N - M
        self.i0 = np.arange(self.MB, dtype=np.int64) * R                 # first query row of each block row
        self.i1 = np.minimum(self.i0 + R, M) - 1                          # last query row
        self.j0 = np.arange(self.NB, dtype=np.int64) * C                  # first key column of each block column
        self.j1 = np.minimum(self.j0 + C, N) - 1

    def span(self, value: int) -> int:
        """A window or stride in tokens, cut at max(M, N): ``|d| < max(M, N)`` for every element, so any larger one
        lists the same blocks (and a Python int past int64 meets no NumPy overflow)."""
        return min(value, max(self.seq_lens))

    def d_range(self):
        """``[MB, NB]`` smallest and largest ``d = i + (N - M) - j`` over the elements of each block."""
        dmin = self.i0[:, None] + self.offset - self.j1[None, :]
        dmax = self.i1[:, None] + self.offset - self.j0[None, :]
        return dmin, dmax

    def band_mask(self, lo, hi) -> np.ndarray:
        """``[MB, NB]``: blocks holding an element with ``lo <= d <= hi`` (``None``: unbounded)."""
        dmin, dmax = self.d_range()
        out = np.ones((self.MB, self.NB), bool)
        if lo is not None:
            out &= dmax >= lo
        if hi is not None:
            out &= dmin <= hi
        return out

    def layout_from_mask(self, mask: np.ndarray) -> BlockSparseLayout:
        return BlockSparseLayout.from_block_mask(mask, self.block_size, self.seq_lens)


def _band_layout(grid: _Grid, lo, hi) -> BlockSparseLayout:
    """Layout of the blocks holding an element with ``lo <= d <= hi``, built row by row from column ranges
    (O(MB log NB + nnz), no ``MB x NB`` array): along a block row the listed columns are contiguous."""
    first = grid.i0 + grid.offset - (hi if hi is not None else np.iinfo(np.int64).max // 4)
    last = grid.i1 + grid.offset - (lo if lo is not None else -(np.iinfo(np.int64).max // 4))
    c_lo = np.searchsorted(grid.j1, first, side="left")                  # first column with j1 >= i0 + off - hi
    c_hi = np.searchsorted(grid.j0, last, side="right")                  # one past the last with j0 <= i1 + off - lo
    counts = np.maximum(c_hi - c_lo, 0)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    total = int(indptr[-1])
    starts = np.repeat(c_lo - indptr[:-1], counts)                        # column = start + position in indices
    indices = (starts + np.arange(total)).astype(np.int32)
    return BlockSparseLayout(indptr.astype(np.int32), indices, grid.block_size, grid.seq_lens)


# ---- structured patterns --------------------------------------------------------------------------

def block_causal(seq_lens, block_size) -> BlockSparseLayout:
    """The blocks on or below the (bottom-right aligned) diagonal: ``d >= 0`` somewhere in the block.

    Use with ``causal=True`` in the attention call to mask the upper part of the diagonal blocks.
    """
    return _band_layout(_Grid(seq_lens, block_size), 0, None)


def sliding_window(seq_lens, block_size, window: int, *, causal: bool = True) -> BlockSparseLayout:
    """Local attention: query ``i`` sees the ``window`` keys ending at its diagonal, ``0 <= d < window``
    (``causal=True``), or the keys with ``|d| < window`` (``causal=False``), rounded out to whole blocks.

    With ``causal=True`` this is block-causal + local window (Mistral / Longformer local attention).
    """
    window = _integer("window", window)
    if window < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window}")
    causal = static_flag("causal", causal)
    grid = _Grid(seq_lens, block_size)
    window = grid.span(window)
    return _band_layout(grid, 0 if causal else -(window - 1), window - 1)


def strided(seq_lens, block_size, stride: int, *, causal: bool = True, local: bool = True) -> BlockSparseLayout:
    """Sparse Transformer "strided" attention (Child et al., 2019): query ``i`` sees the keys with
    ``d % stride == 0`` (every ``stride``-th token back from its diagonal) and, with ``local=True``, the
    ``stride`` keys ending at its diagonal. ``causal=True`` keeps ``d >= 0``; otherwise both directions."""
    stride = _integer("stride", stride)
    if stride < 1:
        raise ValueError(f"stride must be a positive number of tokens, got {stride}")
    causal, local = static_flag("causal", causal), static_flag("local", local)
    grid = _Grid(seq_lens, block_size)
    stride = grid.span(stride)
    dmin, dmax = grid.d_range()
    if causal:
        dmin = np.maximum(dmin, 0)
    mask = (dmax >= dmin) & ((dmax // stride) * stride >= dmin)           # a multiple of stride in [dmin, dmax]
    if local:
        mask |= grid.band_mask(0 if causal else -(stride - 1), stride - 1)
    return grid.layout_from_mask(mask)


def global_local(seq_lens, block_size, window: int, global_tokens: int | Iterable[int] = 1, *,
                 causal: bool = False) -> BlockSparseLayout:
    """Longformer / BigBird (ITC) attention: a local window (as :func:`sliding_window`; 0 for none) plus global
    tokens that see every key and are seen by every query.

    ``global_tokens`` is a count (the first tokens, e.g. a CLS token) or the token positions, in ``[0, N)``:
    token ``t`` is key ``t`` and, queries being the last ``M`` tokens (the bottom-right alignment above), query
    row ``t - (N - M)`` where that is in ``[0, M)`` (so with ``M < N``, e.g. decoding, an early global token is
    seen by every query without making a query row global). With ``causal=True`` global tokens too respect
    ``d >= 0``. Add BigBird's random blocks with ``union(global_local(...), random(...))``.
    """
    grid = _Grid(seq_lens, block_size)
    M, N = grid.seq_lens
    positions = _token_positions(global_tokens, N)
    window = _integer("window", window)
    if window < 0:
        raise ValueError(f"window must be >= 0 tokens (0: no local window), got {window}")
    window = grid.span(window)
    causal = static_flag("causal", causal)
    R, C = grid.block_size
    q_pos = positions - grid.offset  # query rows of the global tokens
    q_pos, k_pos = q_pos[(q_pos >= 0) & (q_pos < M)], positions
    # the blocks holding an element of a global query row i or key column j; with causal=True one with
    # d = i + (N - M) - j >= 0 on that row or column itself (not merely somewhere in the block)
    q_sees = grid.j0[None, :] <= q_pos[:, None] + grid.offset  # [global query row, block column c]
    k_seen = grid.i1[:, None] + grid.offset >= k_pos[None, :]  # [block row r, global key]
    if not causal:
        q_sees, k_seen = np.ones_like(q_sees), np.ones_like(k_seen)
    mask = np.zeros((grid.MB, grid.NB), bool)
    np.logical_or.at(mask, q_pos // R, q_sees)
    np.logical_or.at(mask, (slice(None), k_pos // C), k_seen)
    if window >= 1:
        mask |= grid.band_mask(0 if causal else -(window - 1), window - 1)
    return grid.layout_from_mask(mask)


def _token_positions(global_tokens, N: int) -> np.ndarray:
    """global_local's ``global_tokens``: a count (the first tokens) or any iterable of positions, each in [0, N)."""
    try:
        count = _integer("global_tokens", global_tokens)
    except TypeError:  # not a count: positions
        count = None
    if count is not None:
        if not 0 <= count <= N:
            raise ValueError(f"global_tokens (a count) must be in [0, N] = [0, {N}], got {count}")
        return np.arange(count, dtype=np.int64)
    try:  # (arrays of any rank, sets, generators; not a string, a bool or a traced value)
        if isinstance(global_tokens, (str, bytes)) or _is_traced(global_tokens):
            raise TypeError
        items = list(np.ravel(global_tokens)) if hasattr(global_tokens, "__array__") else list(global_tokens)
    except TypeError:
        raise TypeError(f"global_tokens must be a count or token positions (integers), got {global_tokens!r}") from None
    positions = [_integer("global token position", t) for t in items]
    bad = [t for t in positions if not 0 <= t < N]  # (checked as Python ints: 2^70 is out of range, not an overflow)
    if bad:
        raise ValueError(f"global token positions must be in [0, N) = [0, {N}), got {bad[0]}")
    return np.asarray(positions, np.int64)


def random(seq_lens, block_size, blocks_per_row: int, *, seed: int = 0, causal: bool = False,
           batch_shape: Sequence[int] = ()) -> BlockSparseLayout:
    """``blocks_per_row`` distinct key blocks per block row, drawn uniformly (BigBird's random attention).

    With ``causal=True`` only blocks holding an element with ``d >= 0`` are drawn (rows with fewer such
    blocks list them all; so does every row where ``blocks_per_row`` is at least the number of block columns). ``batch_shape`` draws independent layouts, e.g. ``(Hk,)`` for one per KV head.
    Deterministic in ``seed``.
    """
    grid = _Grid(seq_lens, block_size)
    k = _integer("blocks_per_row", blocks_per_row)
    if k < 0:
        raise ValueError(f"blocks_per_row must be >= 0, got {blocks_per_row}")
    seed, causal = _integer("seed", seed), static_flag("causal", causal)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    try:
        batch_shape = tuple(_integer("batch_shape", d) for d in batch_shape)
    except TypeError:
        raise TypeError(f"batch_shape must be a sequence of integers, got {batch_shape!r}") from None
    if any(d < 0 for d in batch_shape):
        raise ValueError(f"batch_shape must hold sizes >= 0, got {batch_shape}")
    allowed = grid.band_mask(0, None) if causal else np.ones((grid.MB, grid.NB), bool)
    keys = np.random.default_rng(seed).random(tuple(batch_shape) + (grid.MB, grid.NB))
    keys = np.where(allowed, keys, np.inf)
    k = min(k, grid.NB)
    mask = np.zeros(keys.shape, bool)
    if k:
        chosen = np.argpartition(keys, k - 1, axis=-1)[..., :k]
        np.put_along_axis(mask, chosen, True, axis=-1)
    return grid.layout_from_mask(mask & allowed)


# ---- combinations ---------------------------------------------------------------------------------

def _same_geometry(layouts: Sequence[BlockSparseLayout], what: str):
    if not layouts:
        raise ValueError(f"{what} needs at least one layout")
    for lay in layouts:
        if not isinstance(lay, BlockSparseLayout):
            raise TypeError(f"{what} takes BlockSparseLayouts, got {type(lay).__name__}")
    first = layouts[0]
    for lay in layouts[1:]:
        if (lay.block_size, lay.seq_lens) != (first.block_size, first.seq_lens):
            raise ValueError(f"{what}: layouts differ in block_size / seq_lens: {first} vs {lay}")
    return first.block_size, first.seq_lens


def _common_batch_shape(layouts: Sequence[BlockSparseLayout], who: str) -> tuple[int, ...]:
    shapes = [l.batch_shape for l in layouts]
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ValueError(f"{who}: the layouts' batch shapes {shapes} do not broadcast together") from None


def _block_masks(layouts):
    """Block masks of the layouts: NumPy when every layout is concrete, jnp otherwise."""
    if any(_is_traced(l.indptr) or _is_traced(l.indices) for l in layouts):
        return jnp, [l.to_block_mask() for l in layouts]
    return np, [_block_counts_numpy(np.asarray(l.indptr), np.asarray(l.indices), l.num_block_rows,
                                    l.num_block_cols) > 0 for l in layouts]


def _combine(layouts, op: str, nnz):
    block_size, seq_lens = _same_geometry(layouts, op)
    _common_batch_shape(layouts, op)  # (a clear error before the masks meet)
    xp, masks = _block_masks(layouts)
    combined = masks[0]
    for m in masks[1:]:
        combined = (combined | m) if op == "union" else (combined & m)
    if xp is np and nnz is not None:  # (the error names this call, not from_block_mask's argument)
        most = int(combined.sum(-1).sum(-1).max(initial=0))
        if _nnz(nnz) < most:
            raise ValueError(f"{op}: nnz={nnz} is smaller than the {most} blocks the {op} lists")
    if xp is jnp:
        if nnz is None:   # static: enough for the combination of the given layouts
            mb, nb = combined.shape[-2:]
            nnz = min(mb * nb, sum(l.nnz for l in layouts)) if op == "union" else min(l.nnz for l in layouts)
        return BlockSparseLayout.from_block_mask(combined, block_size, seq_lens, nnz=nnz)
    return BlockSparseLayout.from_block_mask(np.asarray(combined), block_size, seq_lens, nnz=nnz)


def union(*layouts: BlockSparseLayout, nnz: int | None = None) -> BlockSparseLayout:
    """The blocks listed by any of the layouts (same block_size and seq_lens; batch shapes broadcast).

    Concrete layouts give a concrete layout; with a traced one the result is traced and ``nnz`` (static)
    defaults to ``min(MB * NB, sum of the nnz)``."""
    return _combine(layouts, "union", nnz)


def intersection(*layouts: BlockSparseLayout, nnz: int | None = None) -> BlockSparseLayout:
    """The blocks listed by all of the layouts (same block_size and seq_lens; batch shapes broadcast).

    With a traced layout the result is traced and ``nnz`` defaults to the smallest of the nnz."""
    return _combine(layouts, "intersection", nnz)


def per_head(layouts: Sequence[BlockSparseLayout]) -> BlockSparseLayout:
    """Stacks one layout per KV head along a new last batch axis (a per-head mixture of patterns, e.g.
    half the heads local, half strided). The layouts share block_size and seq_lens; their batch shapes
    (``()`` or ``(B,)``) broadcast; the result has batch shape ``(*that, len(layouts))``, shorter layouts
    padded with entries past ``indptr[-1]``."""
    layouts = list(layouts)
    block_size, seq_lens = _same_geometry(layouts, "per_head")
    lead = _common_batch_shape(layouts, "per_head")
    width = max(l.nnz for l in layouts)
    traced = any(_is_traced(l.indptr) or _is_traced(l.indices) for l in layouts)
    xp = jnp if traced else np

    def padded(l):
        ip = xp.broadcast_to(xp.asarray(l.indptr), lead + l.indptr.shape[-1:])
        ix = xp.asarray(l.indices)
        ix = xp.pad(ix, [(0, 0)] * (ix.ndim - 1) + [(0, width - l.nnz)])
        return ip, xp.broadcast_to(ix, lead + (width,))

    parts = [padded(l) for l in layouts]
    indptr = xp.stack([p[0] for p in parts], axis=-2)
    indices = xp.stack([p[1] for p in parts], axis=-2)
    return BlockSparseLayout(indptr, indices, block_size, seq_lens)


# ---- routing inside the model ---------------------------------------------------------------------

def from_topk(scores, k: int, *, seq_lens, block_size, causal: bool = False) -> BlockSparseLayout:
    """Each query block row keeps its ``k`` best-scoring key blocks (MoBA / NSA-style block routing).

    Args:
      scores: float ``[*L, MB, NB]``, concrete or traced (the layout may be chosen inside ``jit``; no
        gradient flows through the choice). Blocks scored ``-inf`` or NaN are never chosen, so a row may list fewer
        than ``k`` blocks; score a block ``+inf`` to force it (e.g. MoBA's current block).
      k: blocks per row (static); ``nnz = MB * k`` (static).
      causal: also never choose a block that holds no element with ``d >= 0``.

    Returns a layout whose rows list their chosen blocks in increasing column order.
    """
    grid = _Grid(seq_lens, block_size)
    MB, NB = grid.MB, grid.NB
    shape = tuple(np.shape(scores))
    if len(shape) < 2 or shape[-2:] != (MB, NB):
        raise ValueError(f"scores has shape {shape}: expected [*L, MB, NB] with (MB, NB) = {(MB, NB)} for "
                         f"seq_lens={grid.seq_lens} and block_size={grid.block_size}")
    k, causal = _integer("k", k), static_flag("causal", causal)
    if not 1 <= k <= NB:
        raise ValueError(f"k must be in [1, NB] = [1, {NB}], got {k}")
    scores = jnp.asarray(scores)
    if jnp.issubdtype(scores.dtype, jnp.complexfloating):  # (astype would drop the imaginary part with a warning)
        raise TypeError(f"scores must be real (integer or floating), got {scores.dtype}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.float32)
    scores = jax.lax.stop_gradient(scores)
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)   # (top_k ranks NaN first: never chosen, as -inf)
    if causal:
        scores = jnp.where(grid.band_mask(0, None), scores, -jnp.inf)
    top_vals, top_cols = jax.lax.top_k(scores, k)                         # [*L, MB, k]
    valid = top_vals > -jnp.inf
    # Valid picks first, in increasing column order; invalid ones sort last (key NB).
    keyed = jnp.sort(jnp.where(valid, top_cols, NB), axis=-1).astype(jnp.int32)
    counts = jnp.sum(valid, axis=-1, dtype=jnp.int32)                     # [*L, MB]
    lead = shape[:-2]
    indptr = jnp.concatenate([jnp.zeros(lead + (1,), jnp.int32), jnp.cumsum(counts, -1, dtype=jnp.int32)], -1)
    # Compact: a stable partition of the row-major entries, valid ones first, lays them out as CSR (no scatter out of
    # bounds: checkify's index checks pass); the unused tail is 0.
    flat = keyed.reshape(lead + (MB * k,))
    order = jnp.argsort((flat >= NB).astype(jnp.int8), axis=-1, stable=True)
    out = jnp.take_along_axis(flat, order, axis=-1)
    return BlockSparseLayout(indptr, jnp.where(out < NB, out, 0), grid.block_size, grid.seq_lens)
