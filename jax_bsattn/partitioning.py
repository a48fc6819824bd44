"""SPMD partitioning of the kernels with ``custom_partitioning`` (Shardy sharding rules), forward and backward.

Under ``jax.jit`` with sharded operands XLA cannot see into a custom call and would all-gather its operands.
The outer primitives' lowering (lowering.py) wraps the FFI call in a ``custom_partitioning`` whose Shardy
rule says which dimensions may stay sharded; the partition callback then runs the kernel on each device's
shard, with no communication of its own.

Factors (canonical shapes, csrc/README.md; ``Hq = Hk * g``, query head ``h`` uses KV head ``h // g``):

======================  =====================================  ===========================================
operand                 dims                                   sharding
======================  =====================================  ===========================================
q, o, do, dq            ``b m (h g) d``                        ``b``, ``h`` (the Hq axis sharded by Hk's axes)
k, v, dk, dv            ``b n h d``                            ``b``, ``h``
lse, delta              ``b m (h g)``                          ``b``, ``h``
indptr, indices         ``LB LH p`` / ``LB LH z``              ``LB`` as ``b`` when LB == B, ``LH`` as ``h``
                                                               when LH == Hk; replicated when 1
kv_lens, q_offset       ``b`` (``[B]``), or ``[0]`` (none)     ``b``; the empty one replicated
======================  =====================================  ===========================================

``b`` and ``h`` are pass-through factors: the batch axis and the KV-head axis shard freely, and the query
head axis shards by the same mesh axes as the KV heads, which keeps each GQA group whole on one device
(Hk-major order). Every other factor -- ``m`` and ``n`` (the sequence axes), ``d``, ``g`` (the heads within a
group), the layout's own dims -- is *need-replication*: if an operand arrives sharded along one of them,
XLA all-gathers that axis before the call (the result is right, the all-gather is the cost). A sequence
sharding of a block-sparse layout would need row/column re-basing per shard (context parallelism), which
this op does not do. The partition callback derives every operand's sharding from one choice of batch axes
(q's, else k's) and KV-head axes (k's, else q's) and drops axes that do not divide B or Hk, so a surprising
propagation can cost communication but never give a wrong answer. Query heads within a GQA group are never
split: with MQA (Hk = 1) a head-sharded q is all-gathered along its heads. Where a mesh axis does not divide
Hk, the heads are need-replication too (Shardy would otherwise give them a sub-axis, which custom_partitioning
cannot express); an operand that already arrives with such a sub-axis (k reshaped from a feature axis sharded
wider than Hk) still fails inside jax's custom_partitioning before the callback runs (README).
"""

from __future__ import annotations

import math
from functools import partial

from jax.experimental.custom_partitioning import (ArrayMapping, CompoundFactor, SdyShardingRule,
                                                  custom_partitioning)
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from .primitives import Config, bsattn_bwd_ffi_p, bsattn_fwd_ffi_p

__all__ = ["fwd_partitioned", "bwd_partitioned"]


# ---- the Shardy rules ---------------------------------------------------------------------------------

def _shape(t) -> tuple[int, ...]:
    return tuple(mlir.ir.RankedTensorType(t).shape)


class _Factors:
    """The factor of each dimension, from the canonical shapes of q, k and the layout arrays."""

    def __init__(self, q_shape, k_shape, layout_shape, mesh):
        B, _, Hq, _ = q_shape
        Hk = k_shape[2]
        g = Hq // Hk
        replicated = ["m", "n", "d", "p", "z"]
        self.sizes = {}
        if not all(Hk % n == 0 for n in getattr(mesh, "shape", {}).values()):
            # A mesh axis that does not divide Hk: Shardy would hand the heads a sub-axis (q's heads over 4 devices
            # with Hk = 2 split it between h and g; so does k reshaped from a feature axis sharded 4 ways), which
            # custom_partitioning cannot express. The heads are then replicated (all-gathered), the batch still not.
            self.qh = "qh"
            replicated += ["qh", "h"]
        elif g == 1:
            self.qh = "h"
        elif Hk == 1:
            self.qh = "g"
            replicated.append("g")
        else:
            self.qh = CompoundFactor("h", "g")          # Hk-major: sharding Hq like Hk keeps groups whole
            self.sizes["g"] = g
            replicated.append("g")
        self.lb = "b" if layout_shape[0] == B else "lb"
        self.lh = "h" if layout_shape[1] == Hk else "lh"
        replicated += [f for f in ("lb", "lh") if f in (self.lb, self.lh)]
        self.replicated = tuple(replicated)

    def q(self):
        return ArrayMapping("b", "m", self.qh, "d")

    def rows(self):                                        # lse, delta: [B, M, Hq]
        return ArrayMapping("b", "m", self.qh)

    @staticmethod
    def kv():
        return ArrayMapping("b", "n", "h", "d")

    def layout(self):
        return ArrayMapping(self.lb, self.lh, "p"), ArrayMapping(self.lb, self.lh, "z")

    @staticmethod
    def per_sequence(shape, empty):                        # kv_lens, q_offset: [B], or [0] (none: `empty`, replicated)
        return ArrayMapping(empty if shape[0] == 0 else "b")

    def rule(self, operands, results) -> SdyShardingRule:
        order = []                                          # factors in order of first use (Shardy wants the
        for mapping in (*operands, *results):               # special factors sorted that way)
            for dim in mapping:
                order += [f for f in ((dim,) if isinstance(dim, str) else dim) if f not in order]
        replicated = tuple(sorted((*self.replicated, *(f for f in ("kl", "qo") if f in order)), key=order.index))
        return SdyShardingRule(tuple(operands), tuple(results), need_replication_factors=replicated, **self.sizes)


def _fwd_rule(cfg, mesh, operand_types, result_types):
    q, k, _, ip, _, kl, qo = (_shape(t) for t in operand_types)
    f = _Factors(q, k, ip, mesh)
    return f.rule([f.q(), f.kv(), f.kv(), *f.layout(), f.per_sequence(kl, "kl"), f.per_sequence(qo, "qo")],
                  [f.q(), f.rows()])


def _bwd_rule(cfg, mesh, operand_types, result_types):
    q, k, _, _, _, _, ip, _, kl, qo = (_shape(t) for t in operand_types)
    f = _Factors(q, k, ip, mesh)
    return f.rule([f.q(), f.kv(), f.kv(), f.q(), f.rows(), f.rows(), *f.layout(), f.per_sequence(kl, "kl"),
                   f.per_sequence(qo, "qo")], [f.q(), f.kv(), f.kv()])


# ---- the partition callbacks -----------------------------------------------------------------------------

def _axes(sharding, dim: int) -> tuple[str, ...]:
    spec = getattr(sharding, "spec", None)
    if spec is None or dim >= len(spec) or spec[dim] is None:
        return ()
    entry = spec[dim]
    return (entry,) if isinstance(entry, str) else tuple(entry)


class _Plan:
    """The shardings of every operand and result: batch axes and KV-head axes, shared by all of them."""

    def __init__(self, mesh, q, k, indptr):
        def pick(dim, size):
            for x in (q, k) if dim == 0 else (k, q):
                axes = _axes(x.sharding, dim)
                if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
                    return axes
            return None
        B, Hk = k.shape[0], k.shape[2]
        self.mesh = mesh
        self.b = pick(0, B)            # q's batch axes (else k's)
        self.h = pick(2, Hk)           # k's head axes, else q's when they divide Hk (then k is sliced, not gathered)
        if self.b and self.h and set(self.b) & set(self.h):
            self.h = None
        LB, LH = indptr.shape[:2]
        self.layout_spec = P(self.b if LB == B else None, self.h if LH == Hk else None, None)

    def _ns(self, spec):
        return NamedSharding(self.mesh, spec)

    def data(self):                                        # q, k, v, o, do, dq, dk, dv
        return self._ns(P(self.b, None, self.h, None))

    def rows(self):                                        # lse, delta
        return self._ns(P(self.b, None, self.h))

    def layout(self):
        return self._ns(self.layout_spec), self._ns(self.layout_spec)

    def per_sequence(self, x):                             # kv_lens, q_offset: [B] as the batch; [0] replicated
        return self._ns(P(self.b if x.shape[0] else None))


def _partition_fwd(cfg: Config, mesh, arg_shapes, result_shape):
    plan = _Plan(mesh, arg_shapes[0], arg_shapes[1], arg_shapes[3])
    args = (plan.data(), plan.data(), plan.data(), *plan.layout(), *map(plan.per_sequence, arg_shapes[5:7]))
    return mesh, partial(_fwd, cfg=cfg), (plan.data(), plan.rows()), args


def _partition_bwd(cfg: Config, mesh, arg_shapes, result_shape):
    plan = _Plan(mesh, arg_shapes[0], arg_shapes[1], arg_shapes[6])
    args = (plan.data(),) * 4 + (plan.rows(),) * 2 + plan.layout() + tuple(map(plan.per_sequence, arg_shapes[8:10]))
    return mesh, partial(_bwd, cfg=cfg), (plan.data(),) * 3, args


# GSPMD (only when Shardy is switched off): the result shardings follow the same plan.
def _infer_fwd(cfg, mesh, arg_shapes, result_shape):
    plan = _Plan(mesh, arg_shapes[0], arg_shapes[1], arg_shapes[3])
    return plan.data(), plan.rows()


def _infer_bwd(cfg, mesh, arg_shapes, result_shape):
    plan = _Plan(mesh, arg_shapes[0], arg_shapes[1], arg_shapes[6])
    return (plan.data(),) * 3


# ---- the partitioned calls (cfg is static): the inner primitive, on global shapes when inlined (one
# device), on each device's shard when partitioned ------------------------------------------------------

def _fwd(q, k, v, indptr, indices, kv_lens, q_offset, cfg):
    return tuple(bsattn_fwd_ffi_p.bind(q, k, v, indptr, indices, kv_lens, q_offset, cfg=cfg))


def _bwd(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg):
    return tuple(bsattn_bwd_ffi_p.bind(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, cfg=cfg))


fwd_partitioned = custom_partitioning(_fwd, static_argnums=(7,))
fwd_partitioned.def_partition(partition=_partition_fwd, infer_sharding_from_operands=_infer_fwd,
                              sharding_rule=_fwd_rule)
bwd_partitioned = custom_partitioning(_bwd, static_argnums=(10,))
bwd_partitioned.def_partition(partition=_partition_bwd, infer_sharding_from_operands=_infer_bwd,
                              sharding_rule=_bwd_rule)
