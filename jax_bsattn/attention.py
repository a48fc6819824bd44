"""The public op: argument checks, canonical shapes, and the custom VJP over the two primitives."""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _extension  # noqa: F401  (registers the FFI targets)
from . import lowering  # noqa: F401  (registers the lowerings)
from .per_sequence import canonical_kv_lens, canonical_q_offset
from .layout import BlockSparseLayout, monotone_indptr, static_flag
from .partitioning import RowSplit, bwd_sequence_split, fwd_sequence_split, manual_row_split
from .primitives import SUPPORTED_DTYPES, Config, bsattn_bwd_p, bsattn_fwd_p, to_common_variance

__all__ = ["as_jax_arrays", "block_sparse_attention", "check_inputs", "check_per_sequence", "check_q_offset_causal",
           "static_flag", "static_float"]


class Shapes(NamedTuple):
    batch: tuple[int, ...]  # *B
    M: int
    N: int
    Hq: int
    Hk: int
    D: int


def as_jax_arrays(*xs):
    """NumPy arrays -> jax arrays of jax's canonical dtype (float64 -> float32 without x64), as jit reads them: an
    eager call then takes what a jitted one takes."""
    return tuple(jnp.asarray(x) if isinstance(x, np.ndarray) else x for x in xs)


MAX_SOFT_CAP = 2.0 ** 100  # the largest logits_soft_cap (check_inputs says why)
_PER_SEQUENCE = {"kv_lens": "key counts per batch element", "q_offset": "causal offsets per batch element"}


def check_per_sequence(name: str, x, batch: tuple[int, ...]) -> None:
    """``kv_lens`` or ``q_offset`` (``name``): None, or integers broadcasting against the batch dims ``*B``."""
    if x is None:
        return
    what = _PER_SEQUENCE[name]
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None:  # a Python int or a list
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be an integer array, got {type(x).__name__}") from None
        shape, dtype = arr.shape, arr.dtype
        if dtype == object and all(type(e) is int for e in arr.reshape(-1)):  # (Python ints past int64: clipped)
            dtype = np.dtype(np.int64)
    if jnp.dtype(dtype).kind not in "iu":
        raise TypeError(f"{name} must hold integers ({what}), got dtype {dtype}")
    if len(shape) > len(batch) or any(a not in (1, b) for a, b in zip(tuple(shape)[::-1], batch[::-1])):
        raise ValueError(f"{name} of shape {tuple(shape)} does not broadcast against the batch dims *B = {batch} "
                         f"({what}: q is [*B, M, Hq, D])")


def check_q_offset_causal(q_offset, causal: bool) -> None:
    """``q_offset`` places the causal mask: given without ``causal=True`` it is an error."""
    if q_offset is not None and not causal:
        raise ValueError("q_offset positions the causal mask (key j seen by query row i where j <= i + q_offset[b]) "
                         "and needs causal=True; without it every row of a listed block sees every key")


def check_inputs(q, k, v, layout, logits_soft_cap=None) -> Shapes:
    """Trace-time checks of the public arguments; errors name the argument and the shapes."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim < 3:
            raise ValueError(f"{name} must be [*B, seq, heads, head_dim]; got shape {x.shape}")
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: float32, bfloat16, float16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {k.shape}, v {v.shape}")
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"q and k must share the batch dims *B; got q {q.shape}, k {k.shape}")
    *batch, M, Hq, D = q.shape
    N, Hk, Dk = k.shape[-3:]
    if D < 1:
        raise ValueError(f"the head dim must be at least 1; got q {q.shape}")
    if Dk != D:
        raise ValueError(f"q and k must share the head dim; got q {q.shape}, k {k.shape}")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"query heads ({Hq}, q {q.shape}) must be a multiple of KV heads ({Hk}, k {k.shape})")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a jax_bsattn.BlockSparseLayout, got {type(layout).__name__}")
    if tuple(layout.seq_lens) != (M, N):
        raise ValueError(f"layout.seq_lens={layout.seq_lens} does not match q {q.shape} and k {k.shape}: "
                         f"expected (M, N) = {(M, N)}")
    target = tuple(batch) + (Hk,)
    L = layout.batch_shape
    ok = len(L) <= len(target) and all(a in (1, b) for a, b in zip(L[::-1], target[::-1]))
    if not ok:
        raise ValueError(f"layout batch shape {L} does not broadcast against (*B, Hk) = {target} "
                         f"(q {q.shape}, k {k.shape}); use (), (Hk,), (B, 1) or (B, Hk)")
    if logits_soft_cap is not None:
        cap = np.float32(static_float("logits_soft_cap", logits_soft_cap))
        # (a normal float32: the kernels take 0 for "no cap", and a subnormal one flushed to 0 would read as that)
        if not cap >= np.finfo(np.float32).tiny:
            raise ValueError(f"logits_soft_cap must be a positive normal float32 (at least "
                             f"{np.finfo(np.float32).tiny:.4g}) or None, got {logits_soft_cap}")
        # s / c is flushed to 0 below float32's smallest normal (XLA's CPU, jnp there too), so scores |s| < 2^-126 c
        # lose their value: at most 2^-26 up to this bound (no more than float32's rounding of the scores near 1 that
        # count); past it, at c = 1e37, scores up to 0.1 read as 0 (and past 2^126, 1 / c itself is 0: every score 0)
        if cap > MAX_SOFT_CAP:
            raise ValueError(f"logits_soft_cap must be at most 2**100 (about {MAX_SOFT_CAP:.4g}): s / c would "
                             f"underflow float32 for scores that count (a cap that large leaves every score below 1e26 "
                             f"as it is: pass None), got {logits_soft_cap}")
    return Shapes(tuple(batch), M, N, Hq, Hk, D)


def static_float(name: str, x) -> float:
    """A float attribute of the op (scale, logits_soft_cap): compiled into the kernels, so concrete and finite."""
    # (bool and complex arrays too: float() would take True as 1 and drop an imaginary part with only a warning)
    if isinstance(x, (str, bytes, bool, np.bool_)) or getattr(getattr(x, "dtype", None), "kind", "") in ("b", "c"):
        raise TypeError(f"{name} must be a real number, got {x!r}")
    try:
        f = float(x)
    except jax.errors.ConcretizationTypeError:
        raise TypeError(f"{name} must be a concrete number: it is compiled into the kernels, and got a traced value "
                        f"(pass a Python float, or scale q by a traced factor instead)") from None
    except OverflowError:
        raise ValueError(f"{name} must be finite (the kernels take it as float32), got {x!r}") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {x!r}") from None
    with np.errstate(over="ignore"):  # (1e39 -> inf in float32 is the point of the test)
        finite32 = bool(np.isfinite(np.float32(f)))  # (nan and inf stay so in float32)
    if not finite32:
        raise ValueError(f"{name} must be finite (the kernels take it as float32), got {f}")
    return f


def _canonical_layout(x, batch: tuple[int, ...], Hk: int):
    """``[*L, X]`` layout array -> ``[LB, LH, X]`` with LB in {1, prod(B)} and LH in {1, Hk}."""
    lead = (1,) * (len(batch) + 1 - (x.ndim - 1)) + tuple(x.shape[:-1])
    x = x.reshape(lead + x.shape[-1:])
    LH = lead[-1]
    lb = lead[:-1]
    if all(d == 1 for d in lb):
        LB = 1
    else:
        if lb != batch:  # some batch dims broadcast, others not: materialise (layouts are small)
            x = jnp.broadcast_to(x, batch + (LH,) + x.shape[-1:])
        LB = math.prod(batch)
    return x.reshape(LB, LH, x.shape[-1])


def is_ring(name: str, mode) -> bool:
    """``context_parallel``: ``"all_gather"`` (False) or ``"ring"`` (True); anything else an error naming it."""
    if not isinstance(mode, str) or mode not in ("all_gather", "ring"):
        raise ValueError(f"{name} must be 'all_gather' or 'ring', got {mode!r}")
    return mode == "ring"


def check_zigzag_shards(shards) -> None:
    """``zigzag_shards``: None or a positive integer (a concrete one: it fixes the order)."""
    if shards is not None and (not isinstance(shards, (int, np.integer)) or isinstance(shards, (bool, np.bool_))
                               or shards < 1):
        raise ValueError(f"zigzag_shards must be None or a positive integer, got {shards!r}")


def zigzag_order_shards(shards, q, k, layout) -> int:
    """``zigzag_shards``: None (0), or S >= 1 that cuts q into 2S chunks of whole block rows and k into 2S chunks;
    S = 1 is the natural order (0). (After check_inputs: q, k arrays, layout a BlockSparseLayout.)"""
    check_zigzag_shards(shards)
    if shards is None:
        return 0
    M, N, R, S = q.shape[-3], k.shape[-3], int(layout.block_size[0]), int(shards)
    if M % (2 * S * R) or N % (2 * S):
        raise ValueError(f"zigzag_shards={S}: q's M = {M} rows must split into 2 x {S} chunks of whole block rows "
                         f"(R = {R}) and k's N = {N} into 2 x {S} chunks")
    return 0 if S == 1 else S


def _none():
    return jnp.zeros((0,), jnp.int32)  # (a per-sequence operand, kv_lens or q_offset: none)


# kv_lens: int32 [B] (canonical_kv_lens), or [0]: none (N keys each); q_offset: int32 [B] (canonical_q_offset), or [0]:
# none (N - M). Both go to the kernels, forward and backward.
@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, indptr, indices, kv_lens, q_offset, cfg: Config):
    return tuple(bsattn_fwd_p.bind(q, k, v, indptr, indices, kv_lens, q_offset, cfg=cfg))


def _attention_fwd(q, k, v, indptr, indices, kv_lens, q_offset, cfg: Config):
    o, lse = bsattn_fwd_p.bind(q, k, v, indptr, indices, kv_lens, q_offset, cfg=cfg)
    return (o, lse), (q, k, v, o, lse, indptr, indices, kv_lens, q_offset)


def _backward_operands(cfg: Config, q, k, o, lse, kv_lens, cts):
    """The backward kernels' do and delta from the cotangents of (o, lse)."""
    do, dlse = cts
    do = jnp.asarray(do, q.dtype)
    # A row that sees no key (lse -inf) has o = 0 whatever its cotangent: a NaN there (e.g. from a log of o behind a
    # where) must not reach dq, dk, dv through the kernels' p = 0 (0 x NaN), so its do and dlse are made 0. Such a
    # row meets the kernels' products only beside live rows of its tile: under the causal mask, with kv_lens (a row
    # whose keys are all past its length, beside the keys of a listed block), or where R * g < 64 (tiles that span
    # block rows: the sweeps, the 16-row mma.sync tiles). Elsewhere the row's block row lists nothing and no kernel
    # reads it, so the copy of do (0.4-0.9 % of a step) is skipped.
    # (With do and dlse 0 there, delta = rowsum(0 * o) - 0 is 0 too: o is 0 on such a row.)
    dlse = jnp.asarray(dlse, jnp.float32)
    if cfg.causal or kv_lens.shape[0] or cfg.block_r * (q.shape[2] // k.shape[2]) < 64:
        dead = lse == -jnp.inf
        do = jnp.where(dead[..., None], jnp.zeros_like(do), do)
        dlse = jnp.where(dead, jnp.zeros_like(dlse), dlse)
    # delta = rowsum(dO * O) - dlse: a cheap XLA fusion; the kernels then need neither o nor dlse.
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1) - dlse
    return do, delta


def _attention_bwd(cfg: Config, res, cts):
    q, k, v, o, lse, indptr, indices, kv_lens, q_offset = res
    do, delta = _backward_operands(cfg, q, k, o, lse, kv_lens, cts)
    dq, dk, dv = bsattn_bwd_p.bind(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg=cfg)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# Inside jax.shard_map with the sequence split over named mesh axes (sequence_axis): the per-device functions of
# partitioning.py on this device's shards, with the collectives over those axes (no partitioner to insert them).
@partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention_split(q, k, v, indptr, indices, kv_lens, q_offset, cfg: Config, row_split: RowSplit):
    return fwd_sequence_split(q, k, v, indptr, indices, kv_lens, q_offset, cfg, row_split)


def _attention_split_fwd(q, k, v, indptr, indices, kv_lens, q_offset, cfg: Config, row_split: RowSplit):
    o, lse = fwd_sequence_split(q, k, v, indptr, indices, kv_lens, q_offset, cfg, row_split)
    return (o, lse), (q, k, v, o, lse, indptr, indices, kv_lens, q_offset)


def _attention_split_bwd(cfg: Config, row_split: RowSplit, res, cts):
    q, k, v, o, lse, indptr, indices, kv_lens, q_offset = res
    do, delta = _backward_operands(cfg, q, k, o, lse, kv_lens, cts)
    grads = bwd_sequence_split(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg, row_split)
    return grads + (None, None, None, None)


_attention_split.defvjp(_attention_split_fwd, _attention_split_bwd)


def check_sequence_axis(sequence_axis) -> tuple[str, ...]:
    """``sequence_axis``'s form (None: ``()``; a mesh axis name, or a non-empty tuple of them), checked where it is
    given (the Flax module's constructor too): the axes."""
    if sequence_axis is None:
        return ()
    axes = (sequence_axis,) if isinstance(sequence_axis, str) else sequence_axis
    if not isinstance(axes, tuple) or not axes or not all(isinstance(a, str) for a in axes):
        raise ValueError(f"sequence_axis must be None, a mesh axis name or a tuple of them, got {sequence_axis!r}")
    return axes


def sequence_axes(sequence_axis) -> tuple[tuple[str, ...], int]:
    """``sequence_axis`` (not None): the axes of an enclosing ``jax.shard_map`` and the devices along them."""
    axes = check_sequence_axis(sequence_axis)
    try:
        parts = int(jax.lax.axis_size(axes))
    except NameError:
        raise ValueError(f"sequence_axis={sequence_axis!r} is not an axis of an enclosing jax.shard_map: the argument "
                         f"is for the op inside shard_map (under jax.jit with sharded q, k, v the sequence's split is "
                         f"read from their shardings)") from None
    return axes, parts


def check_sequence_split(sequence_axis, parts: int, zigzag_shards, M_local: int, layout) -> None:
    """With ``sequence_axis`` over ``parts`` devices: each device's rows whole block rows, and a zigzag order for
    those devices (after check_inputs: ``layout`` a BlockSparseLayout)."""
    R = int(layout.block_size[0])
    if M_local % R and parts > 1:
        raise ValueError(f"sequence_axis={sequence_axis!r}: each device's {M_local} rows of q must be whole block rows "
                         f"(R = {R}): M = {M_local * parts} split over {parts} devices")
    if zigzag_shards is not None and int(zigzag_shards) != parts:
        raise ValueError(f"zigzag_shards={zigzag_shards} with sequence_axis={sequence_axis!r}: inside shard_map "
                         f"the order must be for the {parts} devices the sequence is split over")


def block_sparse_attention(q, k, v, layout: BlockSparseLayout, *, scale=None, causal=False, logits_soft_cap=None,
                           return_lse=False, deterministic=False, kv_lens=None, q_offset=None,
                           context_parallel="all_gather", zigzag_shards=None, sequence_axis=None):
    """Block-sparse attention: only the blocks that ``layout`` lists are computed.

    Args:
      q: ``[*B, M, Hq, D]`` queries (float32, bfloat16 or float16; the GPU path takes bf16 / f16).
      k, v: ``[*B, N, Hk, D]`` keys and values, same dtype; ``Hq % Hk == 0`` (GQA / MQA: query head ``h``
        uses KV head ``h // (Hq // Hk)``).
      layout: a :class:`BlockSparseLayout` with ``seq_lens == (M, N)``; its leading dims broadcast against
        ``(*B, Hk)``: ``()`` one layout for all, ``(Hk,)`` per KV head, ``(B, 1)`` per batch element, ``(B, Hk)``.
      scale: logits scale, default ``1 / sqrt(D)``; a concrete number (compiled into the kernels, as float32), so a
        traced value is an error: scale q instead.
      causal: also mask ``j > i + (N - M)`` (bottom-right aligned, as FlashAttention and FlashInfer), or
        ``j > i + q_offset[b]`` with ``q_offset``.
      logits_soft_cap: ``c``: logits become ``c * tanh(s / c)``; concrete and positive in float32, like ``scale``.
      return_lse: also return the natural-log log-sum-exp, float32 ``[*B, M, Hq]``.
      deterministic: make the gradients bitwise repeatable. dk and dv always are; on an H100 / H200 with head dim 64 or
        128, C <= 16 and R * g >= 128 (or 64 <= R * g < 128 with C <= 8 at head dim 128, C <= 4 at 64) dq is too (one
        row-oriented pass; dk and dv added as 64-bit fixed point in a workspace of 16 bytes per element of k, with or
        without this flag). Elsewhere on an H100 / H200 (head dim 64 or 128, and C > 16, or C <= 16 with R * g <= 4,
        C <= 2 with R * g < 256, or C <= 4 with R * g <= 8) dq is by default accumulated with float32 atomic adds in a
        workspace of q's shape (4 bytes an element; where the sweep form runs, D = 128 and C a power of two <= 16 with a
        dense enough layout, plus its bit tables, no larger than the layout's indices), whose order varies from run to
        run (differences of the order of float32 rounding).
        ``True`` uses the deterministic backward there as well: no dq workspace (only the long-row / long-column
        splits' areas), slower (BENCHMARKS.md has the figures). No effect on the forward or on the CPU path (deterministic already).
      kv_lens: per-sequence key lengths, integers broadcasting against ``*B`` (may be traced; clipped to
        ``[0, N]``): key ``j`` of batch element ``b`` takes part only where ``j < kv_lens[b]``, whatever the layout
        lists (a serving cache's unwritten tail, a padded batch). The keys past a length are never read, and their
        dk, dv are 0. The kernels take the lengths, forward and backward (no per-batch copy of the layout, one kernel
        call each way). ``causal`` stays
        anchored at N unless ``q_offset`` moves it: with M = N (padded prefill) or M = 1 (decode) that is the usual
        mask; a chunk of M new rows per sequence ending at its length wants ``q_offset = kv_lens - M``.
      q_offset: with ``causal=True``, the key position of query row 0 per sequence, integers broadcasting against
        ``*B`` (may be traced): query row ``i`` of batch element ``b`` sees key ``j`` only where
        ``j <= i + q_offset[b]``. Default ``N - M`` (bottom-right aligned). A chunked prefill, whose new rows end at
        each sequence's length, passes ``kv_lens - M`` (or ``kv_lens - q_lens`` with right-padded chunks). Values are
        clipped to ``[-M, N - 1]`` (past either end every row sees all its keys, or none). The kernels take the offsets,
        forward and backward.
      context_parallel: under ``jax.jit`` with q's sequence split over mesh axes into whole block rows, how the keys
        reach each device's rows. ``"all_gather"`` (default): k and v are all-gathered where they arrive split, and
        each device runs one kernel call against all the keys. ``"ring"``: where k and v arrive split over the same
        axes into whole block columns (``N`` divisible by ``C`` x the devices), they stay split and pass round the
        devices, one shard per step, each step a kernel call on this device's rows against the shard it holds (ring
        attention: no device holds more than two shards of k, v; the backward's dk, dv travel with their shard, in
        float32); the partial outputs are merged by their lse in float32. Elsewhere the same as ``"all_gather"``.
        No effect without such sharding (one device, or inside ``shard_map`` without ``sequence_axis``).
      zigzag_shards: ``S``: q, k, v (and o, lse) hold the sequence in the zigzag order for ``S`` shards
        (:mod:`jax_bsattn.zigzag`: ``2S`` chunks stored as ``0, 2S-1, 1, 2S-2, ...``); the layout, ``kv_lens`` and
        ``q_offset`` stay in natural positions. With q's sequence split over ``S`` devices (whole block rows:
        ``M`` divisible by ``2S x R``; ``N`` by ``2S``) each device holds one early and one late chunk of rows, so
        a causal layout gives every device about the same work; it runs its two chunks (one kernel call each) against
        all the keys, k and v all-gathered and put back in natural order. Elsewhere (one device, or rows split
        otherwise) the op puts q, k, v in natural order, computes, and puts o, lse back (correct, not balanced).
        With ``context_parallel="ring"`` (each device's two chunks of keys whole block columns: ``N`` divisible by
        ``2S x C``) k and v stay split and pass round the devices instead (the zigzag ring): each step, one kernel
        call per chunk of rows and chunk of keys held (four).
      sequence_axis: inside ``jax.shard_map``: the mesh axis name (or tuple of names) the sequence is split over. q,
        k, v (and o, lse) are then this device's shards, ``[*B, M / P, ...]`` and ``[*B, N / P, ...]`` for the P
        devices along the axes (contiguous shards, or with ``zigzag_shards=P`` the zigzag order's), while the layout,
        ``kv_lens`` and ``q_offset`` describe the whole sequences (``seq_lens == (M, N)``); each device's rows must be
        whole block rows. The op makes the collectives itself, as under jit: ``context_parallel`` picks the
        all-gather of k, v or the ring (where each device's keys are whole block columns; else the all-gather), and
        the backward leaves dk, dv as this device's shards. ``None`` (default): q, k, v are whole sequences, as
        everywhere outside shard_map.

    Returns:
      ``o`` in q's dtype, ``[*B, M, Hq, D]`` (and ``lse``). A row with no element taking part gives ``o = 0``
      and ``lse = -inf``. Differentiable in q, k, v; works under jit, vmap (layout arrays included), grad and
      checkpoint; the layout arrays may be traced.
    """
    q, k, v = as_jax_arrays(q, k, v)
    whole = (q, k, v)        # (with sequence_axis: the whole sequences' shapes, of which q, k, v are shards)
    if sequence_axis is not None:
        axes, parts = sequence_axes(sequence_axis)
        if all(getattr(x, "ndim", 0) >= 3 for x in whole):     # (else check_inputs says what is wrong)
            whole = tuple(jax.ShapeDtypeStruct(x.shape[:-3] + (x.shape[-3] * parts,) + x.shape[-2:], x.dtype)
                          for x in whole)
    try:
        shapes = check_inputs(*whole, layout, logits_soft_cap)
    except ValueError as e:
        if sequence_axis is None:
            raise
        raise ValueError(f"{e} (with sequence_axis={sequence_axis!r}: q, k, v are this device's shards of the "
                         f"sequences, {parts} times as long, which the layout describes)") from None
    batch, M, N, Hq, Hk, D = shapes
    check_per_sequence("kv_lens", kv_lens, batch)
    check_per_sequence("q_offset", q_offset, batch)
    B = math.prod(batch)
    zigzag = zigzag_order_shards(zigzag_shards, *whole[:2], layout)
    if sequence_axis is not None:
        check_sequence_split(sequence_axis, parts, zigzag_shards, q.shape[-3], layout)
    cfg = Config(block_r=int(layout.block_size[0]), block_c=int(layout.block_size[1]),
                 scale=D ** -0.5 if scale is None else static_float("scale", scale),
                 softcap=float(0.0 if logits_soft_cap is None else logits_soft_cap),
                 causal=static_flag("causal", causal), deterministic=static_flag("deterministic", deterministic),
                 ring=is_ring("context_parallel", context_parallel), zigzag=zigzag)
    return_lse = static_flag("return_lse", return_lse)
    check_q_offset_causal(q_offset, cfg.causal)
    q3 = jnp.reshape(q, (B, q.shape[-3], Hq, D))           # (this device's shards with sequence_axis)
    k3 = jnp.reshape(k, (B, k.shape[-3], Hk, D))
    v3 = jnp.reshape(v, (B, k.shape[-3], Hk, D))
    indptr = monotone_indptr(_canonical_layout(layout.indptr, batch, Hk), layout.nnz)
    indices = _canonical_layout(layout.indices, batch, Hk)
    lens = _none() if kv_lens is None else canonical_kv_lens(kv_lens, tuple(batch), N)
    offset = _none() if q_offset is None else canonical_q_offset(q_offset, tuple(batch), M, N)
    q3, k3, v3, indptr, indices, lens, offset = to_common_variance(q3, k3, v3, indptr, indices, lens, offset)
    if sequence_axis is None or parts == 1:               # (one device along the axes: whole sequences)
        o, lse = _attention(q3, k3, v3, indptr, indices, lens, offset, cfg)
    else:
        row_split = manual_row_split(axes, parts, k.shape[-3], cfg)
        o, lse = _attention_split(q3, k3, v3, indptr, indices, lens, offset, cfg, row_split)
    o = o.reshape(q.shape)
    if return_lse:
        return o, lse.reshape(tuple(batch) + (q.shape[-3], Hq))
    return o
