"""The primitives: forward (o, lse) and backward (dq, dk, dv), each an outer / inner pair.

All work on canonical shapes (csrc/README.md): q ``[B, M, Hq, D]``, k/v ``[B, N, Hk, D]``, layout arrays
``[LB, LH, ...]`` with LB in {1, B} and LH in {1, Hk}. Per-sequence operands after the layout, forward and backward,
each int32 ``[B]`` or ``[0]`` (none): ``kv_lens`` (keys that take part per batch element; none: N each), then
``q_offset`` (causal: the key position of query row 0; none: N - M).

- The outer primitives ``bsattn_fwd`` / ``bsattn_bwd`` are what jax sees (the custom_vjp in attention.py
  binds them): an abstract eval that checks shapes and dtypes and a batching rule that folds the vmapped axis
  into B (one kernel call, never a loop). Their lowering (lowering.py) goes through ``custom_partitioning``
  (partitioning.py), so that under ``jit`` with sharded operands each device runs on its own shard.
- The inner primitives ``bsattn_fwd_ffi`` / ``bsattn_bwd_ffi`` are bound inside that lowering, on per-device
  shapes, and, inside ``jax.shard_map`` with the op's ``sequence_axis``, by attention.py's custom VJP on this
  device's shards; they lower to the FFI targets of each platform.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching
from jax.sharding import NamedSharding, PartitionSpec

try:  # jax >= 0.4.36
    from jax._src.dispatch import apply_primitive as _apply_primitive
except ImportError:  # pragma: no cover
    from jax.interpreters.xla import apply_primitive as _apply_primitive

__all__ = ["Config", "bsattn_fwd_p", "bsattn_bwd_p", "bsattn_fwd_ffi_p", "bsattn_bwd_ffi_p", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class Config(NamedTuple):
    """Static parameters of one attention call (hashable: it is a primitive parameter)."""
    block_r: int
    block_c: int
    scale: float
    softcap: float  # 0.0: no soft cap
    causal: bool
    # backward: bitwise repeatable dq too (the GPU's fastest dq adds in float atomics; see attention.py)
    deterministic: bool = False
    # context parallelism (q's rows and k split over the same mesh axes): k, v pass round the devices (ring) instead
    # of being all-gathered (partitioning.py; attention.py's context_parallel)
    ring: bool = False
    # q, k, v, o, lse hold the sequence in the zigzag order for this many shards (zigzag.py); 0: natural order
    zigzag: int = 0


def _primitive(name: str) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = True
    prim.def_impl(partial(_apply_primitive, prim))
    return prim


bsattn_fwd_p = _primitive("bsattn_fwd")
bsattn_bwd_p = _primitive("bsattn_bwd")
# Inner primitives: the kernels on per-device shapes (bound inside the outer primitives' lowering, and by the
# shard_map form of the op, attention.py's _attention_split).
bsattn_fwd_ffi_p = _primitive("bsattn_fwd_ffi")
bsattn_bwd_ffi_p = _primitive("bsattn_bwd_ffi")


# ---- abstract evaluation -----------------------------------------------------------------------------

def _expect(cond: bool, msg: str, exc=ValueError):
    if not cond:
        raise exc(f"jax_bsattn: {msg}")


def _check_canonical(q, k, v, indptr, indices, cfg: Config):
    _expect(q.ndim == 4 and k.ndim == 4 and v.ndim == 4,
            f"q, k, v must be [B, M, Hq, D] / [B, N, Hk, D]; got {q.shape}, {k.shape}, {v.shape}")
    B, M, Hq, D = q.shape
    _expect(k.shape == v.shape, f"k {k.shape} and v {v.shape} must have the same shape")
    _expect(k.shape[0] == B and k.shape[3] == D, f"k {k.shape} does not match q {q.shape}")
    Hk = k.shape[2]
    _expect(Hk > 0 and Hq % Hk == 0, f"query heads {Hq} must be a multiple of KV heads {Hk}")
    _expect(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}", TypeError)
    _expect(q.dtype in SUPPORTED_DTYPES, f"dtype {q.dtype} not supported (float32, bfloat16, float16)", TypeError)
    MB = -(-M // cfg.block_r)
    _expect(indptr.ndim == 3 and indptr.shape[2] == MB + 1,
            f"indptr must be [LB, LH, MB + 1] with MB = {MB}; got {indptr.shape}")
    _expect(indices.ndim == 3 and indices.shape[:2] == indptr.shape[:2],
            f"indices {indices.shape} must be [LB, LH, nnz] matching indptr {indptr.shape}")
    _expect(indptr.shape[0] in (1, B) and indptr.shape[1] in (1, Hk),
            f"layout dims {indptr.shape[:2]} must be 1 or (B, Hk) = {(B, Hk)}")
    _expect(indptr.dtype == jnp.int32 and indices.dtype == jnp.int32,
            f"indptr/indices must be int32; got {indptr.dtype}, {indices.dtype}", TypeError)
    return B, M, Hq, D


def _varying(aval) -> frozenset:
    """The manual mesh axes (inside shard_map) a value varies over."""
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def to_common_variance(*xs):
    """``xs`` cast (``jax.lax.pcast(..., to="varying")``) to vary over the union of the manual mesh axes (inside
    shard_map) that any of them varies over, as jax's own binary ops do implicitly: e.g. a replicated k beside a q
    split over an axis, or a layout that differs per device beside replicated q, k, v. The cast's transpose sums the
    cotangents back to each operand's own type. Outside shard_map: ``xs`` unchanged."""
    own = [_varying(jax.typeof(x)) for x in xs]
    union = frozenset().union(*own)
    return tuple(x if a == union else jax.lax.pcast(x, tuple(sorted(union - a)), to="varying")
                 for x, a in zip(xs, own))


def _results(data, specs):
    """Result avals ``(like, shape, dtype)``: each sharded like ``like`` (explicit sharding mode: o, dq as q,
    dk, dv as k, v, lse as q's first three dims; custom_vjp wants cotangent types equal to the primals', and
    the partitioner reshards when the kernel's own choice differs, see partitioning.py), and varying (inside
    shard_map) over the manual axes of the operands ``data`` (the layout's included: a layout that differs per
    device makes the results differ too), as jax's own primitives."""
    src = max(data, key=lambda a: len(_varying(a)))
    _expect(all(_varying(a) <= _varying(src) for a in data),
            f"inside shard_map q, k, v, the layout (and do, lse, delta) vary over different mesh axes "
            f"{sorted({tuple(sorted(_varying(a))) for a in data})}: jax.lax.pcast(..., to='varying') them to a "
            f"common set first (block_sparse_attention does: primitives.to_common_variance)")
    out = []
    for like, shape, dtype in specs:
        spec = getattr(getattr(like, "sharding", None), "spec", None)
        if spec is None:                                    # a jax without sharding in types
            out.append(jax.core.ShapedArray(shape, dtype))
            continue
        spec = (tuple(spec) + (None,) * len(shape))[:len(shape)]
        out.append(src.update(shape=shape, dtype=dtype, weak_type=False,
                              sharding=NamedSharding(like.sharding.mesh, PartitionSpec(*spec))))
    return tuple(out)


def _check_per_sequence(B: int, **operands):
    for name, x in operands.items():
        _expect(x.ndim == 1 and x.shape[0] in (0, B) and x.dtype == jnp.int32,
                f"{name} must be int32 [B] = [{B}] or [0]; got {x.shape} {x.dtype}")


def _fwd_abstract_eval(q, k, v, indptr, indices, kv_lens, q_offset, *, cfg: Config):
    B, M, Hq, D = _check_canonical(q, k, v, indptr, indices, cfg)
    _check_per_sequence(B, kv_lens=kv_lens, q_offset=q_offset)
    return _results((q, k, v, indptr, indices, kv_lens, q_offset),
                    [(q, q.shape, q.dtype), (q, (B, M, Hq), jnp.float32)])


def _bwd_abstract_eval(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, *, cfg: Config):
    B, M, Hq, D = _check_canonical(q, k, v, indptr, indices, cfg)
    _check_per_sequence(B, kv_lens=kv_lens, q_offset=q_offset)
    _expect(do.shape == q.shape and do.dtype == q.dtype, f"do {do.shape} {do.dtype} must match q {q.shape} {q.dtype}")
    for name, x in (("lse", lse), ("delta", delta)):
        _expect(x.shape == (B, M, Hq) and x.dtype == jnp.float32, f"{name} must be float32 {(B, M, Hq)}; got "
                f"{x.shape} {x.dtype}")
    return _results((q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset),
                    [(q, q.shape, q.dtype), (k, k.shape, k.dtype), (v, v.shape, v.dtype)])


for _p in (bsattn_fwd_p, bsattn_fwd_ffi_p):
    _p.def_abstract_eval(_fwd_abstract_eval)
for _p in (bsattn_bwd_p, bsattn_bwd_ffi_p):
    _p.def_abstract_eval(_bwd_abstract_eval)


# ---- batching: fold the vmapped axis into the batch / layout-batch dimension -------------------------

_NOT_MAPPED = None   # how vmap marks an unmapped argument (the public `batching.not_mapped` alias is gone)

def _fold_data(x, dim, n):
    """[B, ...] operand -> [n * B, ...] (broadcast when it is not mapped)."""
    if dim is _NOT_MAPPED:
        x = jnp.broadcast_to(x, (n,) + x.shape)
    else:
        x = jnp.moveaxis(x, dim, 0)
    return x.reshape((n * x.shape[1],) + x.shape[2:])


def _fold_layout(x, dim, n, B, shared: bool):
    """[LB, LH, ...] layout array -> [LB', LH, ...] valid for batch n * B: LB' = 1 where ``shared`` (no layout array
    is mapped and this one has LB = 1), else n * B (indptr and indices must keep equal leading dims, so an unmapped
    one beside a mapped one is broadcast)."""
    if dim is _NOT_MAPPED:
        if shared:
            return x                                       # one layout for every batch element: stays shared
        x = jnp.broadcast_to(x, (n,) + x.shape)
    else:
        x = jnp.moveaxis(x, dim, 0)
    if x.shape[1] != B:
        x = jnp.broadcast_to(x, (n, B) + x.shape[2:])
    return x.reshape((n * B,) + x.shape[2:])


def _batch_size(args, dims):
    return next(x.shape[d] for x, d in zip(args, dims) if d is not _NOT_MAPPED)


def _unbatched_B(x, dim):
    """The canonical batch size B of a data operand, with the vmapped axis (if any) taken out."""
    shape = list(x.shape)
    if dim is not _NOT_MAPPED:
        del shape[dim]
    return shape[0]


def _fold_per_sequence(x, dim, n):
    """kv_lens, q_offset ``[B]`` -> ``[n * B]`` like a data operand; ``[0]`` (none) stays so where it is not mapped."""
    if dim is _NOT_MAPPED and x.shape[0] == 0:
        return x
    return _fold_data(x, dim, n)


def _make_batcher(prim, num_data: int):
    """Operands: ``num_data`` data arrays, indptr, indices, then the per-sequence ones (kv_lens, q_offset)."""
    def batcher(args, dims, *, cfg):
        n = _batch_size(args, dims)
        B = _unbatched_B(args[0], dims[0])
        data = [_fold_data(x, d, n) for x, d in zip(args[:num_data], dims[:num_data])]
        lay_args, lay_dims = args[num_data:num_data + 2], dims[num_data:num_data + 2]
        shared = all(d is _NOT_MAPPED and x.shape[0] == 1 for x, d in zip(lay_args, lay_dims))
        layout = [_fold_layout(x, d, n, B, shared) for x, d in zip(lay_args, lay_dims)]
        extra = [_fold_per_sequence(x, d, n) for x, d in zip(args[num_data + 2:], dims[num_data + 2:])]
        outs = prim.bind(*data, *layout, *extra, cfg=cfg)
        return [o.reshape((n, B) + o.shape[1:]) for o in outs], [0] * len(outs)
    return batcher


# (the inner primitives too: inside shard_map with the op's sequence_axis, attention.py binds them directly)
for _p, _n in ((bsattn_fwd_p, 3), (bsattn_bwd_p, 6), (bsattn_fwd_ffi_p, 3), (bsattn_bwd_ffi_p, 6)):
    batching.primitive_batchers[_p] = _make_batcher(_p, num_data=_n)


# ---- differentiation: first order only (the custom_vjp in attention.py); a second derivative says so -------------

def _no_second_derivative(primals, tangents, **params):
    raise NotImplementedError(
        "jax_bsattn: block_sparse_attention has a first derivative only (jax.grad, jax.vjp); a derivative of its "
        "gradient (grad of grad, jax.hessian, jax.jvp of a gradient, an exported VJP of order 2) is not implemented")


for _p in (bsattn_fwd_p, bsattn_bwd_p, bsattn_fwd_ffi_p, bsattn_bwd_ffi_p):
    ad.primitive_jvps[_p] = _no_second_derivative


def ffi_attributes(cfg: Config) -> dict:
    """The FFI attributes every kernel takes (names and types per csrc/README.md)."""
    return dict(block_r=np.int64(cfg.block_r), block_c=np.int64(cfg.block_c), scale=np.float32(cfg.scale),
                softcap=np.float32(cfg.softcap), causal=bool(cfg.causal))
