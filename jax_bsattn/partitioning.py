"""SPMD partitioning of the kernels with ``custom_partitioning`` (Shardy sharding rules), forward and backward.

Under ``jax.jit`` with sharded operands XLA cannot see into a custom call and would all-gather its operands.
The outer primitives' lowering (lowering.py) wraps the FFI call in a ``custom_partitioning`` whose Shardy
rule says which dimensions may stay sharded; the partition callback then runs the kernel on each device's
shard, with no communication of its own but where q's rows are split: the backward sums dk and dv over them, or,
with ``cfg.ring`` (the op's ``context_parallel="ring"``), k and v pass round the row axes (ring attention; with
``cfg.zigzag``, the zigzag ring). The same per-device functions serve the op inside ``jax.shard_map`` with its
``sequence_axis`` (``fwd_sequence_split`` / ``bwd_sequence_split``, bound by attention.py's own custom VJP).

Factors (the data operands enter the partitioned calls with their heads and head dim merged, Hk-major:
``[B, S, H * D]``; ``Hq = Hk * g``, query head ``h`` uses KV head ``h // g``):

======================  =====================================  ===========================================
operand                 dims                                   sharding
======================  =====================================  ===========================================
q, o, do, dq            ``b m (h g d)``                        ``b``, ``m``, ``h`` (Hq sharded by Hk's axes)
k, v, dk, dv            ``b n (h d)``                          ``b``, ``h``
lse, delta              ``b m (h g)``                          ``b``, ``m``, ``h``
indptr, indices         ``LB LH p`` / ``LB LH z``              ``LB`` as ``b`` when LB == B, ``LH`` as ``h``
                                                               when LH == Hk; replicated when 1
kv_lens, q_offset       ``b`` (``[B]``), or ``[0]`` (none)     ``b``; the empty one replicated
======================  =====================================  ===========================================

``b`` and ``h`` are pass-through factors: the batch axis and the KV-head axis shard freely, and the query head
axis shards by the same mesh axes as the KV heads, which keeps each GQA group whole on one device (Hk-major
order). ``m``, q's rows, is free where the mesh's device count divides the block rows (else need-replication, so
that Shardy never hands it a sub-axis), and stays split where the axes on q's rows cut them into equal shards of
whole block rows (context parallelism: each device runs its shard of block rows, the layout's rows re-based to the
shard and the causal offset moved by its first row, against all the keys; the backward sums dk and dv over the row
axes). Every other factor -- ``n`` (the key axis), ``d``, ``g`` (the heads within a group), the layout's own dims
-- is *need-replication*: if an operand arrives sharded along one of them, XLA all-gathers that axis before the
call (the result is right, the all-gather is the cost; for k and v split over the sequence, this is the
all-gather-KV form of context parallelism; the ring form, where the callback keeps k and v split over q's row
axes, is its choice, which XLA follows). The partition callback derives every operand's sharding from one
choice of batch axes (q's, else k's), KV-head axes (k's, else q's) and row axes (q's), and drops axes that do not
divide B, Hk or the block rows into equal shards, so a surprising propagation can cost communication but never
give a wrong answer. Query heads within a GQA group are never split: with MQA (Hk = 1) a head-sharded q is
all-gathered along its heads. Where a mesh axis does not divide Hk, the heads are need-replication too (Shardy
would otherwise give them a sub-axis, which custom_partitioning cannot express). An operand that arrives with such
a sub-axis (k reshaped from a feature axis sharded wider than Hk: its heads and head dim each over part of the
axis) is why the data operands are merged: on the merged dim the same sharding is one whole axis, which
custom_partitioning takes (on the 4-d shape it failed inside jax before the partition callback ran); the plan then
all-gathers the heads.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import (ArrayMapping, CompoundFactor, SdyShardingRule,
                                                  custom_partitioning)
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from .live_blocks import keep_blocks_below
from .primitives import Config, bsattn_bwd_ffi_p, bsattn_fwd_ffi_p
from .zigzag import from_zigzag, to_zigzag

__all__ = ["fwd_partitioned", "bwd_partitioned"]


# ---- the Shardy rules ---------------------------------------------------------------------------------

def _shape(t) -> tuple[int, ...]:
    return tuple(mlir.ir.RankedTensorType(t).shape)


class _Factors:
    """The factor of each dimension, from the shapes the partitioned calls take (data operands with their heads and
    head dim merged: ``_merge``), the head dim D and the mesh."""

    def __init__(self, q_shape, k_shape, layout_shape, D, R, mesh):
        B, Hq, Hk = q_shape[0], q_shape[2] // D, k_shape[2] // D
        g = Hq // Hk
        sizes = getattr(mesh, "shape", {}).values()
        replicated = ["n", "d", "p", "z"]
        if not _rows_split(q_shape[1], R, math.prod(sizes)):
            # q's rows shard only into whole block rows, on every device alike (_Plan.m); where the mesh could not
            # cut them so, they are need-replication, so that Shardy never hands them a sub-axis
            replicated.append("m")
        self.known = {"d": D, "h": Hk, "g": g, "qh": Hq}   # sizes, given to Shardy where no dim is the factor alone
        if not all(Hk % n == 0 for n in sizes):
            # A mesh axis that does not divide Hk: Shardy would hand the heads a sub-axis (q's heads over 4 devices
            # with Hk = 2 split it between h and g), which custom_partitioning cannot express. The heads are then
            # replicated (all-gathered), the batch still not.
            self.heads = ("qh",)
            replicated += ["qh", "h"]
        elif g == 1:
            self.heads = ("h",)
        elif Hk == 1:
            self.heads = ("g",)
            replicated.append("g")
        else:
            self.heads = ("h", "g")                          # Hk-major: sharding Hq like Hk keeps groups whole
            replicated.append("g")
        self.lb = "b" if layout_shape[0] == B else "lb"
        self.lh = "h" if layout_shape[1] == Hk else "lh"
        replicated += [f for f in ("lb", "lh") if f in (self.lb, self.lh)]
        self.replicated = tuple(replicated)

    def _dim(self, *factors):
        """One dim made of `factors` (major first): Shardy takes no factor of size 1 in a compound one."""
        kept = [f for f in factors if self.known[f] != 1] or [factors[-1]]
        return kept[0] if len(kept) == 1 else CompoundFactor(*kept)

    def q(self):                                           # q, o, do, dq: [B, M, Hq * D]
        return ArrayMapping("b", "m", self._dim(*self.heads, "d"))

    def rows(self):                                        # lse, delta: [B, M, Hq]
        return ArrayMapping("b", "m", self._dim(*self.heads))

    def kv(self):                                          # k, v, dk, dv: [B, N, Hk * D]
        return ArrayMapping("b", "n", self._dim("h", "d"))

    def layout(self):
        return ArrayMapping(self.lb, self.lh, "p"), ArrayMapping(self.lb, self.lh, "z")

    @staticmethod
    def per_sequence(shape, empty):                        # kv_lens, q_offset: [B], or [0] (none: `empty`, replicated)
        return ArrayMapping(empty if shape[0] == 0 else "b")

    def rule(self, operands, results) -> SdyShardingRule:
        order, whole = [], set()                            # factors in order of first use (Shardy wants the
        for mapping in (*operands, *results):               # special factors sorted that way); those alone in a dim
            for dim in mapping:
                whole.update((dim,) if isinstance(dim, str) else ())
                order += [f for f in ((dim,) if isinstance(dim, str) else dim) if f not in order]
        replicated = tuple(sorted((f for f in (*self.replicated, "kl", "qo") if f in order), key=order.index))
        sizes = {f: n for f, n in self.known.items() if f in order and f not in whole}   # (Shardy infers the rest)
        return SdyShardingRule(tuple(operands), tuple(results), need_replication_factors=replicated, **sizes)


def _rows_split(M: int, R: int, parts: int) -> bool:
    """Whether M query rows split into ``parts`` equal shards of whole block rows (R rows each)."""
    return M > 0 and parts >= 1 and M % (parts * R) == 0


def _fwd_rule(cfg, D, mesh, operand_types, result_types):
    q, k, _, ip, _, kl, qo = (_shape(t) for t in operand_types)
    f = _Factors(q, k, ip, D, cfg.block_r, mesh)
    return f.rule([f.q(), f.kv(), f.kv(), *f.layout(), f.per_sequence(kl, "kl"), f.per_sequence(qo, "qo")],
                  [f.q(), f.rows()])


def _bwd_rule(cfg, D, mesh, operand_types, result_types):
    q, k, _, _, _, _, ip, _, kl, qo = (_shape(t) for t in operand_types)
    f = _Factors(q, k, ip, D, cfg.block_r, mesh)
    return f.rule([f.q(), f.kv(), f.kv(), f.q(), f.rows(), f.rows(), *f.layout(), f.per_sequence(kl, "kl"),
                   f.per_sequence(qo, "qo")], [f.q(), f.kv(), f.kv()])


# ---- the partition callbacks -----------------------------------------------------------------------------

def _axes(sharding, dim: int) -> tuple[str, ...]:
    spec = getattr(sharding, "spec", None)
    if spec is None or dim >= len(spec) or spec[dim] is None:
        return ()
    entry = spec[dim]
    return (entry,) if isinstance(entry, str) else tuple(entry)


class RowSplit(NamedTuple):
    """q's rows split over mesh axes (context parallelism), as the partitioned calls take it."""
    axes: tuple[str, ...]     # the mesh axes over q's rows
    parts: int                # the shards (devices along those axes)
    scatter: bool             # dk, dv leave split over the axes (k arrived so): a reduce-scatter, else an all-reduce
    ring: bool                # k, v stay split over the axes and pass round them (cfg.ring): no all-gather
    zigzag: bool              # the rows are in zigzag order for `parts` shards (cfg.zigzag): two chunks a device
    mesh_axes: tuple[str, ...] = ()   # `axes` in the mesh's order, which ppermute numbers devices by (): as given


def _ring_fits(N_local: int, zigzag: bool, block_c: int) -> bool:
    """Whether every piece of keys a device holds (its shard, or in zigzag order each of its two chunks) is whole
    block columns: the ring's condition (a block's keys on one device, in one kernel call)."""
    pieces = 2 if zigzag else 1
    return N_local % pieces == 0 and (N_local // pieces) % block_c == 0


def _in_mesh_order(axes, mesh_axis_names) -> tuple[str, ...]:
    ordered = tuple(a for a in mesh_axis_names if a in axes)
    return ordered if len(ordered) == len(axes) else tuple(axes)


class _Plan:
    """The shardings of every operand and result: batch axes, KV-head axes and query-row axes, shared by all of them.
    The data operands come with their heads and head dim merged (Hk-major), so axes that divide Hk shard whole heads
    (and whole GQA groups of q). q's rows (and o, do, dq, lse, delta) stay split where q's sequence axes cut them
    into equal shards of whole block rows (context parallelism): each device then runs its block rows against all
    the keys (k, v all-gathered), and dk, dv are summed over those axes; or, with ``cfg.ring`` where k arrives split
    over the same axes into whole block columns, against each shard of keys in turn as they pass round the devices
    (ring attention)."""

    def __init__(self, mesh, q, k, indptr, D, cfg: Config):
        def pick(x, dim, size):
            axes = _axes(x.sharding, dim)
            if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
                return axes
            return None
        B, M, Hk, R = k.shape[0], q.shape[1], k.shape[2] // D, cfg.block_r
        self.mesh = mesh
        self.b = pick(q, 0, B) or pick(k, 0, B)            # q's batch axes (else k's)
        self.h = pick(k, 2, Hk) or pick(q, 2, Hk)          # k's head axes, else q's when they divide Hk (then k is
        if self.b and self.h and set(self.b) & set(self.h):  # sliced, not gathered)
            self.h = None
        axes = _axes(q.sharding, 1)                        # q's row axes: whole block rows, equal shards
        self.parts = math.prod(mesh.shape[a] for a in axes)
        self.m = (axes if axes and not set(axes) & set((self.b or ()) + (self.h or ()))
                  and _rows_split(M, R, self.parts) else None)
        if cfg.zigzag and self.parts != cfg.zigzag:        # zigzag chunks for another shard count: rows gathered
            self.m = None
        # dk, dv leave split over the row axes where k arrives so (q, k, v all split over the sequence): a
        # reduce-scatter of the shards' sums, half an all-reduce's traffic
        self.n = self.m if self.m and _axes(k.sharding, 1) == self.m and k.shape[1] % self.parts == 0 else None
        self.zigzag = bool(cfg.zigzag and self.m)
        # ring: every piece of keys a device holds (a shard; in zigzag order its two chunks) whole block columns (a
        # block's keys on one device, in one kernel call)
        self.ring = bool(cfg.ring and self.n and _ring_fits(k.shape[1] // self.parts, self.zigzag, cfg.block_c))
        LB, LH = indptr.shape[:2]
        self.layout_spec = P(self.b if LB == B else None, self.h if LH == Hk else None, None)

    def _ns(self, spec):
        return NamedSharding(self.mesh, spec)

    def row_split(self):                                   # for the partitioned calls
        return (RowSplit(self.m, self.parts, bool(self.n), self.ring, self.zigzag,
                         _in_mesh_order(self.m, self.mesh.axis_names)) if self.m else None)

    def rows(self):                                        # q, o, do, dq (merged); lse, delta
        return self._ns(P(self.b, self.m, self.h))

    def keys(self):                                        # k, v (merged): all keys on every device, or a shard
        return self._ns(P(self.b, self.n if self.ring else None, self.h))

    def key_grads(self):                                   # dk, dv (merged)
        return self._ns(P(self.b, self.n, self.h))

    def layout(self):
        return self._ns(self.layout_spec), self._ns(self.layout_spec)

    def per_sequence(self, x):                             # kv_lens, q_offset: [B] as the batch; [0] replicated
        return self._ns(P(self.b if x.shape[0] else None))


def _partition_fwd(cfg: Config, D: int, mesh, arg_shapes, result_shape):
    plan = _Plan(mesh, arg_shapes[0], arg_shapes[1], arg_shapes[3], D, cfg)
    args = (plan.rows(),) + (plan.keys(),) * 2 + plan.layout() + tuple(map(plan.per_sequence, arg_shapes[5:7]))
    return mesh, partial(_fwd_local, cfg=cfg, D=D, row_split=plan.row_split()), (plan.rows(),) * 2, args


def _partition_bwd(cfg: Config, D: int, mesh, arg_shapes, result_shape):
    plan = _Plan(mesh, arg_shapes[0], arg_shapes[1], arg_shapes[6], D, cfg)
    args = ((plan.rows(),) + (plan.keys(),) * 2 + (plan.rows(),) * 3 + plan.layout()
            + tuple(map(plan.per_sequence, arg_shapes[8:10])))
    results = (plan.rows(),) + (plan.key_grads(),) * 2
    return mesh, partial(_bwd_local, cfg=cfg, D=D, row_split=plan.row_split()), results, args


# GSPMD (only when Shardy is switched off): the result shardings follow the same plan.
def _infer_fwd(cfg, D, mesh, arg_shapes, result_shape):
    plan = _Plan(mesh, arg_shapes[0], arg_shapes[1], arg_shapes[3], D, cfg)
    return (plan.rows(),) * 2


def _infer_bwd(cfg, D, mesh, arg_shapes, result_shape):
    plan = _Plan(mesh, arg_shapes[0], arg_shapes[1], arg_shapes[6], D, cfg)
    return (plan.rows(),) + (plan.key_grads(),) * 2


# ---- the partitioned calls (cfg, D static): the inner primitive, on global shapes when inlined (one device), on
# each device's shard when partitioned. Their data operands and results are [B, S, H * D]: an operand whose heads
# come sharded over part of a mesh axis (k = x @ Wk reshaped, the feature axis over 4 devices, Hk = 2: heads and
# head dim each over half of it) is one whole axis on the merged dim, which custom_partitioning can express; on the
# 4-d shape it failed inside jax before the partition callback ran. ------------------------------------------

def _merge(x):                                             # [B, S, H, D] -> [B, S, H * D] (no -1: B or S may be 0)
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3])


def _split(x, D):                                          # [B, S, H * D] -> [B, S, H, D] (D >= 1: checked before)
    return x.reshape(*x.shape[:2], x.shape[2] // D, D)


def _layout_rows(indptr, indices, q_offset, first_row, rows: int, B: int, M: int, N: int, cfg: Config):
    """The layout's block rows for q's rows ``[first_row, first_row + rows)`` (whole block rows; ``first_row`` may be
    traced) of all M, against N keys, batch B: indptr's rows, re-based to 0, with indices rotated to match (the same
    static sizes: entries past those rows are never read), and q_offset moved by ``first_row`` (with none, from the
    anchor N - M)."""
    R = cfg.block_r
    ip = jax.lax.dynamic_slice_in_dim(indptr, first_row // R, rows // R + 1, axis=-1)
    base = ip[..., :1]                                     # (monotone in [0, nnz]: attention.py monotone_indptr)
    nnz = indices.shape[-1]
    if nnz:
        indices = jnp.take_along_axis(indices, (jnp.arange(nnz, dtype=jnp.int32) + base) % nnz, axis=-1)
    if cfg.causal:
        anchor = q_offset if q_offset.shape[0] else jnp.full((B,), N - M, jnp.int32)
        q_offset = anchor + jnp.asarray(first_row, jnp.int32)
    return ip - base, indices, q_offset


def _local_rows(indptr, indices, q_offset, q, k, cfg: Config, row_split: RowSplit):
    """This device's block rows of the layout and its causal offsets, where q's rows are split over mesh axes (q
    holds this shard's rows, k all the keys or, in a ring, one shard of them)."""
    M, parts = q.shape[1], row_split.parts
    N = k.shape[1] * (parts if row_split.ring else 1)
    return _layout_rows(indptr, indices, q_offset, jax.lax.axis_index(row_split.axes) * M, M, q.shape[0], M * parts,
                        N, cfg)


# ---- ring attention: k, v (and, backward, their gradients' running sums) pass one device on per step, so each device
# meets every key shard while holding one; its rows' partial results are combined in float32. The steps are unrolled
# (XLA may overlap a step's transfer with the previous step's kernels). In zigzag order a device's rows and the key
# shard it holds are each two chunks, not contiguous in the natural order: one kernel call per pair of pieces. -----

def _ring_pass(xs, row_split: RowSplit):
    """``xs`` sent one shard on round the row axes (shard i's to shard i + 1, numbered as ``axis_index(axes)``
    numbers them, the first axis major). ppermute numbers the devices of several axes in the mesh's order, so the
    shards' numbers are translated to it."""
    axes, order = row_split.axes, row_split.mesh_axes or row_split.axes
    size = {a: jax.lax.axis_size(a) for a in axes}

    def device(i):                                         # shard i's number in ppermute's order
        coord = {}
        for a in reversed(axes):
            coord[a], i = i % size[a], i // size[a]
        n = 0
        for a in order:
            n = n * size[a] + coord[a]
        return n

    perm = [(device(i), device((i + 1) % row_split.parts)) for i in range(row_split.parts)]
    return [jax.lax.ppermute(x, tuple(order), perm) for x in xs]


def _ring_row_pieces(indptr, indices, q_offset, q, k, cfg: Config, row_split: RowSplit):
    """This device's rows as pieces contiguous in the natural order: (the piece's slice of q's rows, its layout rows
    and causal offsets); one piece, or in zigzag order its two chunks. (k: the shard a device holds.)"""
    N = k.shape[1] * row_split.parts
    if row_split.zigzag:
        return _zigzag_rows(indptr, indices, q_offset, q.shape[1], q.shape[0], N, cfg, row_split)
    return [(slice(None), _local_rows(indptr, indices, q_offset, q, k, cfg, row_split))]


def _ring_key_slices(Nl: int, row_split: RowSplit):
    """The key shard a device holds (``Nl`` keys) as pieces contiguous in the natural order: the whole shard, or in
    zigzag order its two chunks."""
    return [slice(0, Nl // 2), slice(Nl // 2, Nl)] if row_split.zigzag else [slice(None)]


def _ring_key_firsts(Nl: int, row_split: RowSplit, step: int):
    """The first key (natural order, traced) of each piece of the shard held at ring step ``step``: device
    ``j = (device - step) mod parts``'s; in zigzag order natural chunks ``j`` and ``2 parts - 1 - j``."""
    S = row_split.parts
    j = (jax.lax.axis_index(row_split.axes) - step) % S
    return [j * (Nl // 2), (2 * S - 1 - j) * (Nl // 2)] if row_split.zigzag else [j * Nl]


def _sequence_piece(x, piece: slice):                      # x[:, piece], without an op for the whole of it
    return x if piece == slice(None) else x[:, piece]


def _keys_from(indptr, indices, kv_lens, q_offset, M: int, first, Nl: int, cfg: Config):
    """The layout's lists, key lengths and causal offsets (of M rows) against keys ``[first, first + Nl)`` alone
    (``first``, traced, whole block columns). The indices move by its first block column and the lists keep only
    the blocks then in ``[0, Nl / C)`` (no wrap-around: an index already out of ``[0, NB)`` stays out): the other
    keys' blocks would take no part, but the CUDA kernels pack a row's entries into key tiles by position and would
    compute them, masked, at every step. The lengths and the offsets move by its first key."""
    first = jnp.asarray(first, jnp.int32)
    indices = indices - (first // cfg.block_c).astype(indices.dtype)
    indptr, indices = keep_blocks_below(indptr, indices, jnp.full(indptr.shape[:1], Nl // cfg.block_c, jnp.int32))
    if kv_lens.shape[0]:
        kv_lens = jnp.clip(kv_lens - first, 0, Nl)
    if q_offset.shape[0]:                                  # (causal: per sequence from _layout_rows; clipped as
        q_offset = jnp.clip(q_offset - first, -M, Nl - 1)  # canonical_q_offset clips the op's)
    return indptr, indices, kv_lens, q_offset


def _ring_calls(rows, M: int, Nl: int, kv_lens, cfg: Config, row_split: RowSplit, step: int):
    """The kernel calls of one ring step, one per pair of a piece of keys held (``_ring_key_slices`` of ``Nl``) and a
    piece of rows (``rows``: ``_ring_row_pieces`` of ``M``): the two pieces' indices and the layout's arrays for the
    pair (indptr, indices, kv_lens, q_offset)."""
    size = lambda piece, n: len(range(n)[piece])           # a piece's length along the sequence
    for kp, (keys, first) in enumerate(zip(_ring_key_slices(Nl, row_split), _ring_key_firsts(Nl, row_split, step))):
        for rp, (rows_slice, (ip, ix, qo)) in enumerate(rows):
            yield kp, rp, _keys_from(ip, ix, kv_lens, qo, size(rows_slice, M), first, size(keys, Nl), cfg)


def _combine(o, lse, o_step, lse_step):
    """Two partial softmaxes of the same rows over disjoint keys, merged: o in float32 ``[B, M, H, D]``."""
    total = jnp.logaddexp(lse, lse_step)                   # (-inf with both -inf; NaN stays NaN)
    weight = lambda x: jnp.where(total == -jnp.inf, 0.0, jnp.exp(x - total))[..., None]
    return o * weight(lse) + o_step.astype(jnp.float32) * weight(lse_step), total


def _add(sums: list, i: int, x):                           # a running float32 sum per piece
    sums[i] = x.astype(jnp.float32) if sums[i] is None else x.astype(jnp.float32) + sums[i]


def _joined(pieces: list):                                 # pieces along the sequence, in order, as one array
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def _fwd_ring(q, k, v, indptr, indices, kv_lens, q_offset, cfg, row_split):
    """o, lse of this device's rows against every key shard in turn (4-d q, k, v)."""
    rows = _ring_row_pieces(indptr, indices, q_offset, q, k, cfg, row_split)
    qs = [_sequence_piece(q, rs) for rs, _ in rows]
    pieces = _ring_key_slices(k.shape[1], row_split)
    kv = [_sequence_piece(x, p) for x in (k, v) for p in pieces]   # the k pieces, then the v pieces
    o, lse = [None] * len(rows), [None] * len(rows)        # per piece of rows: o in float32
    for step in range(row_split.parts):
        if step:
            kv = _ring_pass(kv, row_split)
        for kp, rp, layout in _ring_calls(rows, q.shape[1], k.shape[1], kv_lens, cfg, row_split, step):
            o_c, lse_c = bsattn_fwd_ffi_p.bind(qs[rp], kv[kp], kv[len(pieces) + kp], *layout, cfg=cfg)
            o[rp], lse[rp] = ((o_c.astype(jnp.float32), lse_c) if o[rp] is None
                              else _combine(o[rp], lse[rp], o_c, lse_c))
    return _joined(o).astype(q.dtype), _joined(lse)


def _bwd_ring(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg, row_split):
    """dq of this device's rows, and dk, dv of its own key shard: each shard's running sums (float32, a piece each)
    travel with it and come home after the last step (lse and delta are the whole rows', so each step's parts add
    up)."""
    rows = _ring_row_pieces(indptr, indices, q_offset, q, k, cfg, row_split)
    per_row = [[_sequence_piece(x, rs) for x in (q, do, lse, delta)] for rs, _ in rows]
    pieces = _ring_key_slices(k.shape[1], row_split)
    n = len(pieces)
    kv = [_sequence_piece(x, p) for x in (k, v) for p in pieces]   # k pieces, v pieces; then dk, dv pieces
    dq, dkv = [None] * len(rows), [None] * (2 * n)
    for step in range(row_split.parts):
        if step:
            moved = _ring_pass(kv + dkv, row_split)
            kv, dkv = moved[:2 * n], moved[2 * n:]
        for kp, rp, layout in _ring_calls(rows, q.shape[1], k.shape[1], kv_lens, cfg, row_split, step):
            q_r, do_r, lse_r, delta_r = per_row[rp]
            dq_c, dk_c, dv_c = bsattn_bwd_ffi_p.bind(q_r, kv[kp], kv[n + kp], do_r, lse_r, delta_r, *layout, cfg=cfg)
            _add(dq, rp, dq_c), _add(dkv, kp, dk_c), _add(dkv, n + kp, dv_c)
    dkv = _ring_pass(dkv, row_split)
    return _joined(dq).astype(q.dtype), _joined(dkv[:n]).astype(k.dtype), _joined(dkv[n:]).astype(v.dtype)


# ---- zigzag order (zigzag.py): with q's rows split over as many devices as the order's shards, each device holds
# natural chunks i and 2S - 1 - i; it runs each (one kernel call) against all the keys, put in natural order. ------

def _zigzag_rows(indptr, indices, q_offset, M: int, B: int, N: int, cfg: Config, row_split: RowSplit):
    """For each of this device's two chunks of its M rows (zigzag order, M // 2 each; natural chunks i and
    2S - 1 - i), against N keys: the chunk's row slice and its layout rows and causal offsets (``_layout_rows``)."""
    S, Mc, i = row_split.parts, M // 2, jax.lax.axis_index(row_split.axes)
    return [(slice(start, start + Mc), _layout_rows(indptr, indices, q_offset, natural * Mc, Mc, B, M * S, N, cfg))
            for start, natural in ((0, i), (Mc, 2 * S - 1 - i))]


def _zigzag_chunks(k, v, indptr, indices, q_offset, M: int, B: int, cfg: Config, row_split: RowSplit):
    """k, v (all the keys) in natural order, and this device's two chunks of rows (``_zigzag_rows``)."""
    k, v = (from_zigzag(x, row_split.parts, axis=1) for x in (k, v))
    return k, v, _zigzag_rows(indptr, indices, q_offset, M, B, k.shape[1], cfg, row_split)


def _fwd_zigzag(q, k, v, indptr, indices, kv_lens, q_offset, cfg, row_split):
    """o, lse of this device's two chunks of rows (zigzag order, as q) against all the keys."""
    k, v, chunks = _zigzag_chunks(k, v, indptr, indices, q_offset, q.shape[1], q.shape[0], cfg, row_split)
    outs = [bsattn_fwd_ffi_p.bind(q[:, rows], k, v, ip, ix, kv_lens, qo, cfg=cfg) for rows, (ip, ix, qo) in chunks]
    return tuple(jnp.concatenate(x, axis=1) for x in zip(*outs))


def _bwd_zigzag(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg, row_split):
    """dq of this device's rows; dk, dv of all the keys from them (float32, zigzag order: summed over the devices
    by the caller)."""
    k, v, chunks = _zigzag_chunks(k, v, indptr, indices, q_offset, q.shape[1], q.shape[0], cfg, row_split)
    dq, dk, dv = [], 0.0, 0.0
    for rows, (ip, ix, qo) in chunks:
        dq_c, dk_c, dv_c = bsattn_bwd_ffi_p.bind(q[:, rows], k, v, do[:, rows], lse[:, rows], delta[:, rows], ip, ix,
                                                 kv_lens, qo, cfg=cfg)
        dq.append(dq_c)
        dk, dv = dk + dk_c.astype(jnp.float32), dv + dv_c.astype(jnp.float32)
    S = row_split.parts
    return (jnp.concatenate(dq, axis=1),) + tuple(to_zigzag(x, S, axis=1) for x in (dk, dv))


def _fwd_local(q, k, v, indptr, indices, kv_lens, q_offset, cfg, D, row_split=None):
    """The forward on one device's operands (all of them when inlined); ``row_split``: q's rows are a shard."""
    q, k, v = (_split(x, D) for x in (q, k, v))
    if row_split and row_split.ring:
        o, lse = _fwd_ring(q, k, v, indptr, indices, kv_lens, q_offset, cfg, row_split)
    elif row_split and row_split.zigzag:
        o, lse = _fwd_zigzag(q, k, v, indptr, indices, kv_lens, q_offset, cfg, row_split)
    elif row_split:
        indptr, indices, q_offset = _local_rows(indptr, indices, q_offset, q, k, cfg, row_split)
        o, lse = bsattn_fwd_ffi_p.bind(q, k, v, indptr, indices, kv_lens, q_offset, cfg=cfg)
    elif cfg.zigzag:     # whole sequences here: the kernel takes them in natural order
        S = cfg.zigzag
        natural = [from_zigzag(x, S, axis=1) for x in (q, k, v)]
        o, lse = bsattn_fwd_ffi_p.bind(*natural, indptr, indices, kv_lens, q_offset, cfg=cfg)
        o, lse = to_zigzag(o, S, axis=1), to_zigzag(lse, S, axis=1)
    else:
        o, lse = bsattn_fwd_ffi_p.bind(q, k, v, indptr, indices, kv_lens, q_offset, cfg=cfg)
    return _merge(o), lse


def _bwd_local(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg, D, row_split=None):
    """The backward on one device's operands; with ``row_split``, dk and dv summed over the row shards."""
    q, k, v, do = (_split(x, D) for x in (q, k, v, do))
    if row_split and row_split.ring:
        return tuple(map(_merge, _bwd_ring(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg,
                                           row_split)))
    if row_split and row_split.zigzag:
        dq, dk, dv = _bwd_zigzag(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg, row_split)
    elif row_split:
        indptr, indices, q_offset = _local_rows(indptr, indices, q_offset, q, k, cfg, row_split)
        dq, dk, dv = bsattn_bwd_ffi_p.bind(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg=cfg)
    elif cfg.zigzag:
        S = cfg.zigzag
        natural = [from_zigzag(x, S, axis=1) for x in (q, k, v, do, lse, delta)]
        grads = bsattn_bwd_ffi_p.bind(*natural, indptr, indices, kv_lens, q_offset, cfg=cfg)
        dq, dk, dv = (to_zigzag(x, S, axis=1) for x in grads)
    else:
        dq, dk, dv = bsattn_bwd_ffi_p.bind(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg=cfg)
    if row_split:   # each shard's rows add to every key's dk, dv: summed in float32 (one rounding of the sum)
        total = (partial(jax.lax.psum_scatter, scatter_dimension=1, tiled=True) if row_split.scatter
                 else jax.lax.psum)
        dk, dv = (total(x.astype(jnp.float32), row_split.axes).astype(k.dtype) for x in (dk, dv))
    return tuple(map(_merge, (dq, dk, dv)))


# ---- inside jax.shard_map (the op's sequence_axis): q, k, v are this device's shards of sequences split over named
# mesh axes, and the same per-device functions run on them; the all-gather form gathers k, v itself. -------------

def manual_row_split(axes: tuple[str, ...], parts: int, N_local: int, cfg: Config) -> RowSplit:
    """The row split of q, k, v split over ``axes`` (``parts`` devices) inside shard_map: the ring where every piece
    of keys a device holds is whole block columns (else the all-gather, as under jit); dk, dv leave split."""
    ring = bool(cfg.ring and _ring_fits(N_local, bool(cfg.zigzag), cfg.block_c))
    return RowSplit(tuple(axes), parts, True, ring, bool(cfg.zigzag),
                    _in_mesh_order(axes, jax.sharding.get_abstract_mesh().axis_names))


def _manual_keys(k, v, row_split: RowSplit):               # all the keys (all-gather form), or the shard (ring)
    if row_split.ring:
        return k, v
    return tuple(jax.lax.all_gather(x, row_split.axes, axis=1, tiled=True) for x in (k, v))


def fwd_sequence_split(q, k, v, indptr, indices, kv_lens, q_offset, cfg, row_split: RowSplit):
    """o, lse of this device's rows (4-d q, k, v: its shards inside shard_map)."""
    D = q.shape[-1]
    k, v = _manual_keys(k, v, row_split)
    o, lse = _fwd_local(*map(_merge, (q, k, v)), indptr, indices, kv_lens, q_offset, cfg, D, row_split)
    return _split(o, D), lse


def bwd_sequence_split(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg, row_split: RowSplit):
    """dq, dk, dv of this device's shards (dk, dv summed over the devices' rows)."""
    D = q.shape[-1]
    k, v = _manual_keys(k, v, row_split)
    grads = _bwd_local(*map(_merge, (q, k, v, do)), lse, delta, indptr, indices, kv_lens, q_offset, cfg, D,
                       row_split)
    return tuple(_split(x, D) for x in grads)


def _fwd(q, k, v, indptr, indices, kv_lens, q_offset, cfg, D):          # (custom_partitioning reads the signature)
    return _fwd_local(q, k, v, indptr, indices, kv_lens, q_offset, cfg, D)


def _bwd(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg, D):
    return _bwd_local(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg, D)


_fwd_cp = custom_partitioning(_fwd, static_argnums=(7, 8))
_fwd_cp.def_partition(partition=_partition_fwd, infer_sharding_from_operands=_infer_fwd, sharding_rule=_fwd_rule)
_bwd_cp = custom_partitioning(_bwd, static_argnums=(10, 11))
_bwd_cp.def_partition(partition=_partition_bwd, infer_sharding_from_operands=_infer_bwd, sharding_rule=_bwd_rule)


def fwd_partitioned(q, k, v, indptr, indices, kv_lens, q_offset, cfg):
    """o, lse of the forward primitive's operands (4-d q, k, v), partitioned over the mesh."""
    D = q.shape[-1]
    o, lse = _fwd_cp(*map(_merge, (q, k, v)), indptr, indices, kv_lens, q_offset, cfg, D)
    return _split(o, D), lse


def bwd_partitioned(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg):
    """dq, dk, dv of the backward primitive's operands (4-d q, k, v, do), partitioned over the mesh."""
    D = q.shape[-1]
    grads = _bwd_cp(*map(_merge, (q, k, v, do)), lse, delta, indptr, indices, kv_lens, q_offset, cfg, D)
    return tuple(_split(x, D) for x in grads)
