"""The block-sparse (BSR) layout: which R x C blocks of the query x key matrix are computed.

A layout is a pytree whose leaves are the two int32 arrays FlashInfer's ``BlockSparseAttentionWrapper.plan``
takes (``indptr``, ``indices``) and whose static part is the block size and the sequence lengths. Leading
dimensions ``*L`` of the arrays hold several layouts (per batch element and/or per KV head) and broadcast
against ``(*B, Hk)`` the NumPy way.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BlockSparseLayout"]


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _integer(name: str, value: Any) -> int:
    """An integer argument (Python, NumPy or concrete JAX ints): 8.9, "8" or True are mistakes, not sizes to truncate."""
    if _is_traced(value):
        raise TypeError(f"{name} must be a concrete (static) integer: it sets array shapes, and got a traced value")
    if not isinstance(value, (bool, np.bool_)):
        try:
            return operator.index(value)
        except Exception:  # noqa: BLE001 - any malformed value gets the same message
            pass
    raise TypeError(f"{name} must be an integer, got {value!r}")


def static_flag(name: str, x: Any) -> bool:
    """A switch (the op's causal, return_lse, deterministic; the builders' causal, local): True or False, a NumPy
    bool or a concrete 0-d bool array; nothing merely truthy."""
    if _is_traced(x):
        raise TypeError(f"{name} must be a concrete True or False (it picks the compiled code), got a traced value")
    if isinstance(x, (bool, np.bool_)) or (getattr(x, "dtype", None) == np.bool_ and np.shape(x) == ()):
        return bool(x)
    raise TypeError(f"{name} must be True or False, got {x!r}")


def _check_pair(name: str, value: Any) -> tuple[int, int]:
    """block_size (R, C) or seq_lens (M, N): a pair of integers, or one integer for both."""
    if np.ndim(value) == 0 and not isinstance(value, (bool, np.bool_, str, bytes)):
        value = (value, value)
    try:
        a, b = value
        a, b = _integer(name, a), _integer(name, b)
    except Exception:  # noqa: BLE001 - any malformed value gets the same message
        raise TypeError(f"{name} must be a pair of integers (or one for both), got {value!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{name} must be positive, got {(a, b)}")
    if max(a, b) > 1 << 30:  # (the kernels' int32 arithmetic; the handlers refuse more at run time)
        raise ValueError(f"{name} must be at most 2^30, got {(a, b)}")
    return a, b


def _nnz(value: Any) -> int:
    """The static entry count: a non-negative integer."""
    n = _integer("nnz", value)
    if n < 0:
        raise ValueError(f"nnz must be >= 0, got {n}")
    return n


def _as_int32(name: str, x: Any) -> jax.Array | np.ndarray:
    """int32 view of an index array, with a clear error for non-integer input."""
    dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    if not hasattr(x, "dtype") and np.size(x) == 0:
        return np.zeros(np.shape(x), np.int32)              # an empty list: NumPy reads it as float64
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {dtype}")
    if _is_traced(x):
        # (int64 under jax_enable_x64, uint32: values past int32 saturate, so they stay out of range (skipped, or
        # clamped with indptr) instead of wrapping onto a valid block column)
        if dtype.itemsize > 4 or (dtype.itemsize == 4 and dtype.kind == "u"):
            i32 = np.iinfo(np.int32)
            x = jnp.minimum(x, i32.max) if dtype.kind == "u" else jnp.clip(x, i32.min, i32.max)
        return x.astype(jnp.int32)
    arr = np.asarray(x)
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} does not fit in int32")
    return arr.astype(np.int32)


@jax.tree_util.register_pytree_node_class
class BlockSparseLayout:
    """Which R x C blocks of the M x N attention matrix are computed (BSR / CSR of blocks).

    Attributes:
      indptr: int32 ``[*L, MB + 1]``; block row ``r`` lists ``indices[..., indptr[r]:indptr[r + 1]]``.
      indices: int32 ``[*L, nnz]``; block column of each listed block. Entries past ``indptr[..., -1]``
        are padding, so layouts stacked in ``*L`` may list different numbers of blocks.
      block_size: static ``(R, C)``; any integers in [1, 2^30] (as ``seq_lens``).
      seq_lens: static ``(M, N)``; ``MB = ceil(M / R)``, ``NB = ceil(N / C)``.

    Build with :meth:`from_block_mask` or :meth:`from_csr`. Concrete layouts are validated when built;
    traced ones cannot be (see :func:`jax_bsattn.check_layout`), and the kernels skip out-of-range block
    indices and clamp ``indptr`` so that no memory outside the arrays is ever touched.
    """

    indptr: jax.Array
    indices: jax.Array
    block_size: tuple[int, int]
    seq_lens: tuple[int, int]

    def __init__(self, indptr, indices, block_size, seq_lens, *, validate: bool = True):
        self.block_size = _check_pair("block_size", block_size)
        self.seq_lens = _check_pair("seq_lens", seq_lens)
        indptr = _as_int32("indptr", indptr)
        indices = _as_int32("indices", indices)
        if indptr.ndim < 1 or indices.ndim < 1:
            raise ValueError(
                f"indptr and indices need at least one dimension, got shapes {indptr.shape} and {indices.shape}")
        if indptr.shape[-1] != self.num_block_rows + 1:
            raise ValueError(
                f"indptr has shape {indptr.shape}: its last dimension must be MB + 1 = {self.num_block_rows + 1} "
                f"for seq_lens={self.seq_lens} and block_size={self.block_size}")
        if indptr.shape[:-1] != indices.shape[:-1]:
            raise ValueError(
                f"indptr {indptr.shape} and indices {indices.shape} must have the same leading (layout) dimensions")
        if indices.shape[-1] > 2**31 - 1:  # the int32 indptr cannot address more entries
            raise ValueError(f"indices has {indices.shape[-1]} entries in its last dimension: at most 2^31 - 1 "
                             "(indptr is int32)")
        if validate and not (_is_traced(indptr) or _is_traced(indices)):
            _validate_concrete(np.asarray(indptr), np.asarray(indices), self.num_block_cols)
        self.indptr = jnp.asarray(indptr)
        self.indices = jnp.asarray(indices)

    # ---- pytree -----------------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.indptr, self.indices), (self.block_size, self.seq_lens)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.indptr, obj.indices = children
        obj.block_size, obj.seq_lens = aux
        return obj

    # ---- shape ------------------------------------------------------------------------------------
    @property
    def num_block_rows(self) -> int:
        return math.ceil(self.seq_lens[0] / self.block_size[0])

    @property
    def num_block_cols(self) -> int:
        return math.ceil(self.seq_lens[1] / self.block_size[1])

    @property
    def nnz(self) -> int:
        """Entries per layout in ``indices`` (padding included): static."""
        return self.indices.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading layout dimensions ``*L``; they broadcast against ``(*B, Hk)`` from the right, so a
        per-batch layout is ``(B, 1)`` (``(B,)`` would be per KV head)."""
        return tuple(self.indptr.shape[:-1])

    def __repr__(self) -> str:
        return (f"BlockSparseLayout(block_size={self.block_size}, seq_lens={self.seq_lens}, "
                f"batch_shape={self.batch_shape}, nnz={self.nnz})")

    # ---- constructors -----------------------------------------------------------------------------
    @classmethod
    def from_csr(cls, indptr, indices, block_size, seq_lens) -> "BlockSparseLayout":
        """The arrays FlashInfer's ``BlockSparseAttentionWrapper.plan`` takes, with optional leading dims."""
        return cls(indptr, indices, block_size, seq_lens)

    @classmethod
    def from_block_mask(cls, block_mask, block_size, seq_lens, *, nnz: int | None = None) -> "BlockSparseLayout":
        """Layout of the True blocks of a bool ``[*L, MB, NB]`` mask (listed in increasing column order).

        ``nnz`` (entries per layout) is static. For a concrete mask it defaults to the largest block count
        of the layouts in ``*L``; for a traced mask (sparsity chosen inside ``jit``) it defaults to
        ``MB * NB``. Blocks beyond ``nnz`` would be dropped: :func:`jax_bsattn.check_layout` reports it.
        """
        R, C = _check_pair("block_size", block_size)
        M, N = _check_pair("seq_lens", seq_lens)
        MB, NB = math.ceil(M / R), math.ceil(N / C)
        shape = tuple(np.shape(block_mask))
        if len(shape) < 2 or shape[-2:] != (MB, NB):
            raise ValueError(f"block_mask has shape {shape}: expected [*L, MB, NB] with (MB, NB) = {(MB, NB)} "
                             f"for seq_lens={(M, N)} and block_size={(R, C)}")
        if not _is_traced(block_mask):
            mask = np.asarray(block_mask).astype(bool)
            counts = mask.sum(-1)
            indptr = np.concatenate([np.zeros(shape[:-2] + (1,), np.int64), np.cumsum(counts, -1)], -1)
            total = indptr[..., -1]
            most = int(total.max(initial=0))  # (initial: a zero-size *L holds no layout)
            width = most if nnz is None else _nnz(nnz)
            if width < most:
                raise ValueError(f"nnz={width} is smaller than the {most} blocks block_mask holds")
            flat_mask = mask.reshape(-1, MB * NB)
            indices = np.zeros((flat_mask.shape[0], width), np.int32)
            for i, row in enumerate(flat_mask):
                cols = np.nonzero(row)[0] % NB          # row-major: block rows in order, columns ascending
                indices[i, : cols.size] = cols
            return cls(indptr.astype(np.int32), indices.reshape(shape[:-2] + (width,)), (R, C), (M, N))
        width = MB * NB if nnz is None else _nnz(nnz)
        indptr, indices = _csr_from_mask_traced(jnp.asarray(block_mask, bool), width)
        return cls(indptr, indices, (R, C), (M, N))

    # ---- views ------------------------------------------------------------------------------------
    def block_counts(self) -> jax.Array:
        """int32 ``[*L, MB, NB]``: how many times each block is listed (0 or 1 in a valid layout).

        Follows the op's rules exactly: ``indptr`` read through :func:`monotone_indptr` (clamped to
        ``[0, nnz]``, a running maximum), out-of-range block columns skipped, entries past ``indptr[..., -1]``
        ignored.
        """
        MB, NB = self.num_block_rows, self.num_block_cols
        if not (_is_traced(self.indptr) or _is_traced(self.indices)):
            return jnp.asarray(_block_counts_numpy(np.asarray(self.indptr), np.asarray(self.indices), MB, NB))
        return _block_counts_traced(self.indptr, self.indices, MB, NB)

    def to_block_mask(self) -> jax.Array:
        """bool ``[*L, MB, NB]``: the blocks the layout lists."""
        return self.block_counts() > 0

    def to_dense_mask(self) -> jax.Array:
        """bool ``[*L, M, N]``: the elements whose block is listed (causality is not part of a layout)."""
        return expand_blocks(self.to_block_mask(), self.block_size, self.seq_lens)

    @property
    def density(self):
        """Listed blocks over ``MB * NB``, averaged over the layouts in ``*L``."""
        frac = jnp.mean(self.to_block_mask().astype(jnp.float32))
        return frac if _is_traced(frac) else float(frac)

    def plot(self, index: tuple[int, ...] | int = (), *, ax=None, title: str | None = None):
        """Draws the block mask with matplotlib (an optional dependency) and returns the figure.

        ``index`` picks one layout of ``*L`` (missing trailing indices are 0, e.g. ``plot()`` draws the
        first); axes are in tokens, listed blocks dark. ``ax`` draws into existing axes.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("BlockSparseLayout.plot needs matplotlib (`pip install matplotlib`)") from e
        if _is_traced(self.indptr) or _is_traced(self.indices):
            raise TypeError("cannot plot a traced layout: return it from the jitted function first")
        index = (index,) if isinstance(index, int) else tuple(index)
        if len(index) > len(self.batch_shape):
            raise ValueError(f"index {index} has more entries than the layout's batch shape {self.batch_shape}")
        index = index + (0,) * (len(self.batch_shape) - len(index))
        mask = np.asarray(_block_counts_numpy(np.asarray(self.indptr), np.asarray(self.indices),
                                              self.num_block_rows, self.num_block_cols)[index] > 0)
        (R, C), (M, N) = self.block_size, self.seq_lens
        fig = ax.figure if ax is not None else plt.figure()
        ax = ax if ax is not None else fig.add_subplot()
        ax.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto",
                  extent=(0, self.num_block_cols * C, self.num_block_rows * R, 0))
        ax.set_xlim(0, N)
        ax.set_ylim(M, 0)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        where = f" {list(index)}" if index else ""
        ax.set_title(title if title is not None else
                     f"layout{where}: {R}x{C} blocks, density {mask.mean():.3f}")
        return fig


# ---- helpers --------------------------------------------------------------------------------------

def expand_blocks(block_values: jax.Array, block_size, seq_lens) -> jax.Array:
    """``[*L, MB, NB]`` block values repeated to ``[*L, M, N]`` elements (last row/column cut to M, N)."""
    (R, C), (M, N) = block_size, seq_lens
    # (a block longer than its sequence is its only one: repeat it min(R, M) / min(C, N) times, not R / C)
    out = jnp.repeat(jnp.repeat(block_values, min(R, M), axis=-2), min(C, N), axis=-1)
    return out[..., :M, :N]


def monotone_indptr(indptr, nnz: int):
    """``indptr`` clamped to ``[0, nnz]`` and made non-decreasing (a running maximum).

    The identity on every valid layout. Applied (in XLA, O(MB)) before the kernels see a layout, so that a
    traced, malformed ``indptr`` still splits ``indices`` into disjoint row ranges: the forward and the
    backward (whose column view needs each entry in at most one row) then agree on what it means.
    """
    return jax.lax.cummax(jnp.clip(indptr, 0, nnz), axis=indptr.ndim - 1)


def _validate_concrete(indptr: np.ndarray, indices: np.ndarray, NB: int) -> None:
    nnz = indices.shape[-1]
    if (indptr[..., 0] != 0).any():
        raise ValueError(f"indptr must start at 0; got indptr[..., 0] = {np.unique(indptr[..., 0])[:8]}")
    steps = np.diff(indptr, axis=-1)
    if (steps < 0).any():
        where = tuple(int(i) for i in np.argwhere(steps < 0)[0])
        raise ValueError(f"indptr must never decrease; it does at position {where}")
    if (indptr[..., -1] > nnz).any():
        raise ValueError(f"indptr[..., -1] = {int(indptr[..., -1].max())} exceeds nnz = {nnz} "
                         f"(the length of indices' last dimension)")
    used = np.arange(nnz) < indptr[..., -1:]
    bad = used & ((indices < 0) | (indices >= NB))
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"indices must lie in [0, NB) = [0, {NB}); indices{list(pos)} = {int(indices[pos])}")
    counts = _block_counts_numpy(indptr, indices, indptr.shape[-1] - 1, NB)
    if (counts > 1).any():
        pos = tuple(int(i) for i in np.argwhere(counts > 1)[0])
        raise ValueError(f"block (row {pos[-2]}, column {pos[-1]}) is listed more than once"
                         f"{' in layout ' + str(pos[:-2]) if len(pos) > 2 else ''}")


def _block_counts_numpy(indptr: np.ndarray, indices: np.ndarray, MB: int, NB: int) -> np.ndarray:
    lead = indptr.shape[:-1]
    ip = indptr.reshape(-1, MB + 1).astype(np.int64)
    ix = indices.reshape(ip.shape[0], indices.shape[-1])  # (not -1: a zero-size *L holds no layout)
    nnz = ix.shape[-1]
    out = np.zeros((ip.shape[0], MB, NB), np.int32)
    ip = np.maximum.accumulate(np.clip(ip, 0, nnz), axis=-1)        # as monotone_indptr
    start, end = ip[:, :-1], ip[:, 1:]
    lengths = (end - start).reshape(-1)
    total = int(lengths.sum())
    if total:
        seg = np.repeat(np.arange(lengths.size), lengths)        # (layout * MB + row) of each listed entry
        offs = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        pos = np.repeat(start.reshape(-1), lengths) + offs
        lay, row = np.divmod(seg, MB)
        col = ix[lay, pos]
        ok = (col >= 0) & (col < NB)
        np.add.at(out, (lay[ok], row[ok], col[ok]), 1)
    return out.reshape(lead + (MB, NB))


def _block_counts_traced(indptr, indices, MB: int, NB: int):
    """Exact under any indptr: membership [MB, nnz] times one-hot [nnz, NB]."""
    nnz = indices.shape[-1]
    indptr = monotone_indptr(indptr, nnz)
    start, end = indptr[..., :-1], indptr[..., 1:]
    pos = jnp.arange(nnz)
    member = (pos >= start[..., None]) & (pos < end[..., None])              # [*L, MB, nnz]
    onehot = indices[..., None] == jnp.arange(NB)                            # [*L, nnz, NB]; skips invalid
    return jnp.einsum("...rp,...pc->...rc", member.astype(jnp.int32), onehot.astype(jnp.int32))


def _csr_from_mask_traced(mask, nnz: int):
    lead, (MB, NB) = mask.shape[:-2], mask.shape[-2:]
    counts = mask.sum(-1, dtype=jnp.int32)
    indptr = jnp.concatenate([jnp.zeros(lead + (1,), jnp.int32), jnp.cumsum(counts, -1, dtype=jnp.int32)], -1)
    # Columns of each row with the True ones first, in increasing order.
    order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)     # [*L, MB, NB]
    flat_order = order.reshape(lead + (MB * NB,))
    pos = jnp.arange(nnz, dtype=jnp.int32)

    def one(ip, fo):
        row = jnp.clip(jnp.searchsorted(ip[1:], pos, side="right"), 0, MB - 1).astype(jnp.int32)
        k = jnp.clip(pos - ip[row], 0, NB - 1)
        return jnp.where(pos < ip[-1], fo[row * NB + k], 0)

    flat = jax.vmap(one)(indptr.reshape(-1, MB + 1), flat_order.reshape(-1, MB * NB))
    return indptr, flat.reshape(lead + (nnz,))
