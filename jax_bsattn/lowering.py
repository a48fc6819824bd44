"""Lowerings: the outer primitives through ``custom_partitioning`` (partitioning.py), the inner primitives to
the FFI targets of csrc/ (one per platform and direction).

On one device ``custom_partitioning`` inlines its body, so the module holds the FFI custom call itself; on a
mesh it holds a partitioned call whose per-device body is that same custom call on the local shards.
"""

from __future__ import annotations

import functools
import math
import os

import jax
from jax.interpreters import mlir

from ._extension import sm90_kernels
from .column_view import column_order, column_view, walk_order
from .live_blocks import live_row_lists
from .partitioning import bwd_partitioned, fwd_partitioned
from .primitives import Config, bsattn_bwd_ffi_p, bsattn_bwd_p, bsattn_fwd_ffi_p, bsattn_fwd_p, ffi_attributes

# The float32 words after the dq workspace's q.size: the persistent Hopper kernel's work counter (csrc/cuda/bwd/params.h
# kDqSchedWords).
DQ_SCHED_WORDS = 16

# The CUDA kernels' head dims and dtypes; everything else runs on the CPU path only.
CUDA_HEAD_DIMS = (64, 128, 256)
CUDA_DTYPES = ("bfloat16", "float16")


def _check_cuda(q) -> None:
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        raise ValueError(f"jax_bsattn: the CUDA kernels support head dims {CUDA_HEAD_DIMS}; got D = {q.shape[-1]}")
    if q.dtype.name not in CUDA_DTYPES:
        raise TypeError(f"jax_bsattn: the CUDA kernels take {CUDA_DTYPES} inputs; got {q.dtype.name} "
                        "(cast q, k, v explicitly: no silent precision change is made)")


def _check_cuda_sizes(avals, cfg: Config, backward: bool) -> None:
    """The sizes the CUDA kernels' 32-bit index arithmetic holds (csrc/cuda/ffi_common.h check_int32_limits, which
    the handlers apply too): refused at trace time, naming the size. Checked on the FFI operands (one shard's)."""
    q, k, indices = avals[0], avals[1], avals[7 if backward else 4]
    B, M, Hq, D = (int(d) for d in q.shape)
    N, Hk = int(k.shape[1]), int(k.shape[2])
    R, C, nnz = cfg.block_r, cfg.block_c, int(indices.shape[-1])
    limits = [("M (q's sequence length)", M, 2**30), ("N (k's sequence length)", N, 2**30),
              ("block_r (R)", R, 2**30), ("block_c (C)", C, 2**30),
              ("Hq * D (q's heads x head dim)", Hq * D, 2**30),
              ("R * g (block_r x query heads per KV head)", R * (Hq // max(Hk, 1)), 2**31),
              ("B * Hk (batch x KV heads)", B * Hk, 2**31), ("nnz (indices' last dim)", nnz, 2**31),
              ("ceil(N / C) * C (k's padded sequence length)", -(-N // C) * C, 2**30)]
    if backward:
        limits += [("M * Hq (q's rows x heads)", M * Hq, 2**31),
                   ("ceil(M / R) * R (q's padded sequence length)", -(-M // R) * R, 2**30)]
    for what, value, bound in limits:
        if value >= bound:
            raise ValueError(f"jax_bsattn: {what} = {value} is too large for the CUDA kernels (must be < {bound})")


def _ffi_rule(target: str, platform: str):
    rule = jax.ffi.ffi_lowering(target)

    def lower(ctx, *args, cfg: Config):
        if platform == "cuda":
            _check_cuda(ctx.avals_in[0])
        return rule(ctx, *args, **ffi_attributes(cfg))

    return lower


def _partitioned_rule(partitioned, platform: str):
    def call(*args, cfg: Config):
        return partitioned(*args, cfg)

    lower_call = mlir.lower_fun(call, multiple_results=True)

    def lower(ctx, *args, cfg: Config):
        if platform == "cuda":   # checked here too: an error raised inside the partitioner would not surface
            _check_cuda(ctx.avals_in[0])
        return lower_call(ctx, *args, cfg=cfg)

    return lower


# The GPU the CUDA lowerings size their workspaces for: None, the local GPUs (`_local_gpus_are_sm90`); "sm90" or
# "portable" while `jax_bsattn.export` lowers for a GPU other than this machine's.
gpu_target: str | None = None


def _gpus_are_sm90() -> bool:
    """Whether the CUDA lowerings target H100 / H200s with the Hopper kernels (their workspaces, the row-oriented
    backward without the column view): the local GPUs unless an export names its target (`gpu_target`)."""
    if gpu_target is not None:
        return gpu_target == "sm90"
    return _local_gpus_are_sm90()


@functools.lru_cache(maxsize=None)
def _local_gpus_are_sm90() -> bool:
    """Whether the local CUDA devices are compute capability 9.0 (H100 / H200) and the module holds the Hopper
    kernels that run there."""
    if not sm90_kernels():
        return False
    try:
        devs = jax.devices("cuda")
    except RuntimeError:
        return False
    return bool(devs) and all(str(getattr(d, "compute_capability", "")) == "9.0" for d in devs)


def _packed_rule(block_r: int, block_c: int, g: int) -> bool:
    """The packed small-block form's rule (csrc/cuda/bwd/params.h sm90_pack_rule): C <= 16 with R * g <= 4, C <= 2
    with R * g < 256, or C <= 4 with R * g <= 8."""
    rg = block_r * g
    return block_c <= 16 and (rg <= 4 or (block_c <= 2 and rg < 256) or (block_c <= 4 and rg <= 8))


def _sweep_words(q, k, indptr, indices, cfg: Config) -> int:
    """Floats the sweep form of the Hopper backward needs after the dq workspace (csrc/cuda/bwd/params.h
    sm90_sweep_applies and sweep_workspace_words: the same rule; BSATTN_BWD_SWEEP=0 / all: never / wherever D = 128
    and C is a power of two <= 16), else 0."""
    mode = os.environ.get("BSATTN_BWD_SWEEP", "1")
    if mode.startswith("0"):
        return 0
    R, C = cfg.block_r, cfg.block_c
    g = q.shape[-2] // max(k.shape[-2], 1)
    MB, NB = -(-q.shape[1] // R), -(-k.shape[1] // C)
    if q.shape[-1] != 128 or C > 16 or C & (C - 1) or MB <= 0 or NB <= 0:
        return 0
    packed = _packed_rule(R, C, g)
    if not mode.startswith("a") and not packed and C > 4:
        return 0
    if MB * (-(-NB // 64)) * 8 > 4 * indices.shape[-1]:   # the bit map no larger than the layout's indices
        return 0
    # the capacity >= C / 64 of the block grid within the packed rule, >= 1 / 4 outside it
    if not mode.startswith("a") and (64 if packed else 4 * C) * indices.shape[-1] < C * MB * NB:
        return 0
    layouts = math.prod(indptr.shape[:-1]) or 1
    return 8 + 2 * layouts * MB * (-(-NB // 64)) + MB


def _rows_words(q, k, cfg: Config) -> int:
    """Floats of the row-oriented Hopper backward's workspace (csrc/cuda/bwd/params.h rows_sm90_rule and
    rows_workspace_words: D = 64 or 128, C <= 16, R * g >= 128 or R * g >= 64 with C <= 8 (D = 128) or 4 (D = 64);
    64-bit dk and dv sums, four maxima and a flag byte per key row for each; at least the dq workspace's minimum, which
    the handler checks), else 0. BSATTN_BWD_ROWS=0: never. Deterministic as it is, it runs under deterministic=True
    too."""
    g = q.shape[-2] // max(k.shape[-2], 1)
    rg = cfg.block_r * g
    half_empty_c = 8 if q.shape[-1] == 128 else 4  # the largest C where half-empty tiles (R * g = 64) still run
    if (q.shape[-1] not in (64, 128) or cfg.block_c > 16 or rg < 64 or (rg < 128 and cfg.block_c > half_empty_c)
            or q.size == 0 or os.environ.get("BSATTN_BWD_ROWS") == "0" or not _gpus_are_sm90()):
        return 0
    keys = k.size // q.shape[-1]
    return max(q.size + DQ_SCHED_WORDS, 4 * k.size + 8 + 4 * ((2 * keys + 15) // 16))


def _dq_workspace_words(q, k, indptr, indices, cfg: Config) -> int:
    """Floats of the float32 workspace of the CUDA backward: the row-oriented kernel's where it applies (_rows_words),
    else the dq workspace that lets it run the one-pass Hopper kernel (dq by atomic adds; csrc/cuda/bwd/dispatch.cu
    has the same conditions: C > 16, the packed rule or the sweep's), with the sweep's tables or the column split's
    area after it; else (the deterministic pair) its dk / dv kernel's column split (_pair_splits) and its dq kernel's
    row split (_dq_split_words), either, both or none."""
    rows = _rows_words(q, k, cfg)
    if rows:
        return rows
    if q.size == 0:
        return 0
    if not cfg.deterministic and q.shape[-1] <= 128 and _gpus_are_sm90():
        g = q.shape[-2] // max(k.shape[-2], 1)
        sweep = _sweep_words(q, k, indptr, indices, cfg)
        if cfg.block_c > 16 or _packed_rule(cfg.block_r, cfg.block_c, g) or sweep:
            return q.size + DQ_SCHED_WORDS + sweep + _split_words(q, k, indptr, cfg)
    # the deterministic pair: its dk / dv column kernel's split (the mma.sync one where C > 16 and D <= 128, the narrow
    # wgmma one), then its dq kernel's row split, exactly those sizes and shorter than the one-pass kernels'
    # workspace, which is how the handler tells them apart (bwd/params.h is_pair_workspace; else no split)
    cs = _split_words(q, k, indptr, cfg, pair=True) if _pair_splits(q, cfg) else 0
    ds = _dq_split_words(q, k, indptr, cfg)
    # both; else the column split's; else (keys far more than queries) the dq split's (reached only when cs is too
    # large, so never equal to it: the handler tells it by size)
    for words in (cs + ds, cs, ds):
        if words < q.size + DQ_SCHED_WORDS:
            return words
    return 0


def _pair_splits(q, cfg: Config) -> bool:
    """Whether the deterministic pair's dk / dv kernel takes the column split: the mma.sync column kernel where C > 16
    and D <= 128 (csrc/cuda/bwd/launch.cuh), the narrow wgmma kernel on H100 / H200 where D = 128 and 8 < C <= 16 or
    D = 256 and C > 8 (params.h dkdv_sm90_applies; bwd_sm90/dkdv_narrow_kernel.cuh; not with BSATTN_BWD_DKDV=mma)."""
    D, C = q.shape[-1], cfg.block_c
    narrow = ((D == 128 and 8 < C <= 16) or (D == 256 and C > 8)) and os.environ.get("BSATTN_BWD_DKDV") != "mma" \
        and _gpus_are_sm90()
    return narrow or (C > 16 and D <= 128)


def _split_words(q, k, indptr, cfg: Config, pair: bool = False) -> int:
    """Floats the column split takes (csrc/cuda/bwd/params.h split_parts_per_layout and split_workspace_words: the same
    rule; csrc/cuda/bwd/column_split.cuh): after the one-pass kernel's dq workspace where C > 16, or (pair: the
    deterministic pair, _pair_splits) alone, at any C; at least 8 block columns; the item and partial-slot tables, the
    f32 partial sums (a quarter of the block columns per (batch, KV head): at most k's size in bytes).
    BSATTN_BWD_SPLIT=0: none (the device then splits nothing)."""
    if (cfg.block_c <= 16 and not pair) or os.environ.get("BSATTN_BWD_SPLIT") == "0":
        return 0
    NB = -(-k.shape[-3] // cfg.block_c)
    parts = NB // 4
    if parts < 2:
        return 0
    layouts = math.prod(indptr.shape[:-1]) or 1
    heads = math.prod(k.shape[:-3]) * k.shape[-2]
    return 4 * layouts * (NB + parts) + 4 * layouts * parts + heads * parts * 2 * cfg.block_c * q.shape[-1]


# The one-pass backward reorders its column walks (column_view.py walk_order) where the rows its CTAs stream at one
# time (q, do and the float32 dq, 8 bytes a q element, of the heads running together) are at least this. Measured on
# an H200 (L2 50 MB), M = 8192, forward + backward against the increasing walk:
# - 128 MiB and more (g = 4, 8): block-causal, band, band + global and MoBA-like layouts 1.06-1.32x at 64 x 64 and
#   0.997-1.06x at 128 x 128; uniform random layouts 0.994-0.998x (the few XLA ops);
# - 25.6 MiB (g = 1): 0.965-0.99x (the rows stay in L2 whatever the order, and CTAs at one block row add into the
#   same dq rows at once).
# Between the two it is not measured; this keeps the increasing order there. The deterministic pair's dk / dv kernels
# (their workspace, if any, the splits' areas: shorter than the one-pass kernels') walk columns in any order too, but
# lost 0.3-1.4 % to it (session 31: g = 8 and 4, D = 128 deterministic, bigbird, longformer, block-causal, uniform; D =
# 256 g = 4): they keep the increasing order.
WALK_ORDER_MIN_BYTES = 64 << 20
_CTA_SLOTS = 264  # about the one-pass kernel's CTAs in flight on an H100 / H200: 132 SMs x 2 of 64 keys (or 1 of 128)


def _reorders_walks(q, k, cfg: Config, ws_words: int) -> bool:
    """Whether the backward hands the Hopper one-pass kernel (C > 16 with a dq workspace of at least q's size + the
    counter: csrc/cuda/bwd_sm90/launch.cuh) its columns in walk_order. The heads running together: those of one chunk
    of csrc/cuda/common/launch.cuh column_head_chunks (at least a wave of CTAs). BSATTN_BWD_COL_WALK=0: never (A / B),
    =always: whatever the size (tests)."""
    mode = os.environ.get("BSATTN_BWD_COL_WALK", "")
    if mode == "0" or cfg.block_c <= 16 or ws_words < q.size + DQ_SCHED_WORDS or q.size == 0:
        return False
    if mode == "always":
        return True
    B, M, Hq, D = math.prod(q.shape[:-3]), q.shape[-3], q.shape[-2], q.shape[-1]
    heads = B * k.shape[-2]
    per_head = -(-k.shape[-3] // cfg.block_c) * -(-cfg.block_c // 64)  # CTAs of 64 keys per head
    min_heads = -(-_CTA_SLOTS // max(per_head, 1))
    chunk_heads = heads / max(heads // min_heads, 1)
    return 8 * chunk_heads * M * (Hq // max(k.shape[-2], 1)) * D >= WALK_ORDER_MIN_BYTES


def _fwd_sweep_table_words(q, k, indptr, indices, cfg: Config) -> int:
    """Words (u32) of the CUDA forward's workspace: the sweep kernel's bit maps, built once per call (csrc/cuda/fwd/
    params.h fwd_sweep_table_words and fwd_sm90/launch.cuh fwd_sweep_block_rows: the same rule, less the device's
    shared memory, which only the device knows; a workspace it leaves unused costs memory, not results), else 0: each
    CTA builds its rows' maps. BSATTN_FWD_SWEEP=0 / all and BSATTN_FWD_SWEEP_TABLE=0 as on the device."""
    mode = os.environ.get("BSATTN_FWD_SWEEP", "")  # (exact values, as the device reads them)
    if mode == "0" or os.environ.get("BSATTN_FWD_SWEEP_TABLE", "") == "0":
        return 0
    if q.shape[-1] not in (64, 128) or q.size == 0 or not _gpus_are_sm90():
        return 0
    R, C = cfg.block_r, cfg.block_c
    g = q.shape[-2] // max(k.shape[-2], 1)
    M, N = q.shape[1], k.shape[1]
    MB, NB, nnz = -(-M // R), -(-N // C), indices.shape[-1]
    if R * g > 16 or MB <= 0 or NB <= 0:
        return 0
    if mode != "all" and (32 * nnz < R * g * MB * NB or 16 * nnz < MB * NB):
        return 0  # the density (capacity over the block grid) >= R g / 32 and >= 1 / 16
    words = -(-N // 32)
    if MB * words > nnz:  # the maps no larger than the layout's indices
        return 0
    layouts = math.prod(indptr.shape[:-1]) or 1
    return layouts * MB * (words + 1)


def _fwd_split_words(q, k, indptr, cfg: Config) -> int:
    """Words (u32) of the CUDA forward's row split (csrc/cuda/fwd_sm90/row_split.cuh; _row_split_words, few block rows
    included), on H100 / H200. BSATTN_FWD_SPLIT=0: none (the device then splits nothing); nor with
    BSATTN_FWD_KERNEL=mma (the mma.sync kernel, which does not split, runs everywhere)."""
    if os.environ.get("BSATTN_FWD_SPLIT") == "0" or os.environ.get("BSATTN_FWD_KERNEL") == "mma":
        return 0
    return _row_split_words(q, k, indptr, cfg, few_rows=True)


def _dq_split_words(q, k, indptr, cfg: Config) -> int:
    """Floats of the pair's dq row split (csrc/cuda/bwd_sm90/dq_split.cuh: the Hopper dq kernel, which runs where
    R * g > 16; the forward's area for many block rows, _row_split_words). BSATTN_BWD_SPLIT=0 or
    BSATTN_BWD_DQ_SPLIT=0: none; nor with BSATTN_BWD_DQ=mma (the mma.sync dq kernel, which does not split)."""
    if (os.environ.get("BSATTN_BWD_SPLIT") == "0" or os.environ.get("BSATTN_BWD_DQ_SPLIT") == "0"
            or os.environ.get("BSATTN_BWD_DQ") == "mma"):
        return 0
    return _row_split_words(q, k, indptr, cfg, few_rows=False)


# csrc/cuda/fwd/params.h: fewer block rows than this take the few-row rule; partial slots over all (batch, KV head);
# at most these per layout
_SPLIT_FEW_ROWS_MB, _SPLIT_FEW_PLANES, _SPLIT_FEW_MAX_PER_LAYOUT = 16, 512, 128


def _plane_floats(rg: int, D: int) -> int:
    """f32 of one partial slot: o, then lse padded to 16 bytes (csrc/cuda/fwd/params.h fwd_split_plane_floats)."""
    return rg * D + -(-rg // 4) * 4


def _split_shape(q, k, cfg: Config) -> tuple[int, int, int]:
    """(g, MB, heads): query heads per KV head, block rows, (batch, KV head) pairs, as the row split counts them."""
    return q.shape[-2] // max(k.shape[-2], 1), -(-q.shape[-3] // cfg.block_r), math.prod(k.shape[:-3]) * k.shape[-2]


def _few_row_parts(q, k, cfg: Config) -> int:
    """The forward's partial slots per layout where there are fewer than 16 block rows, any R * g (a decode step;
    csrc/cuda/fwd/params.h fwd_split_parts_few_rows: the same rule): up to 512 over the B x Hk heads, 2 to 128 each,
    their planes no larger than twice q in f32 or 2^24 floats; else 0."""
    g, MB, heads = _split_shape(q, k, cfg)
    if MB <= 0 or MB >= _SPLIT_FEW_ROWS_MB or heads <= 0 or g <= 0:
        return 0
    cap = max(2 * q.size, 1 << 24)
    plane = _plane_floats(cfg.block_r * g, q.shape[-1])
    E = min(_SPLIT_FEW_PLANES // heads, _SPLIT_FEW_MAX_PER_LAYOUT, cap // plane // heads)
    return E if E >= 2 else 0


def _split_parts(q, k, cfg: Config, few_rows: bool) -> int:
    """The row split's partial slots per layout (csrc/cuda/fwd/params.h fwd_split_parts_per_layout): an eighth of the
    block rows where R * g > 16 and there are at least 16; else, with few_rows (the forward's), _few_row_parts."""
    g, MB, _ = _split_shape(q, k, cfg)
    if cfg.block_r * g > 16 and MB // 8 >= 2:
        return MB // 8
    return _few_row_parts(q, k, cfg) if few_rows else 0


def _few_rows_split(q, k, cfg: Config) -> bool:
    """Whether the forward's few-row rule applies (fwd_split_parts_few_rows > 0), on H100 / H200."""
    return q.size > 0 and _few_row_parts(q, k, cfg) > 0 and _gpus_are_sm90()


def _row_split_words(q, k, indptr, cfg: Config, few_rows: bool) -> int:
    """32-bit words of a row split's area (csrc/cuda/fwd/params.h fwd_split_workspace_words: the same rule), on
    H100 / H200: the item and partial-slot tables and the pieces' f32 planes (_split_parts of them per (batch, KV
    head): with many block rows about q's size / 8 in floats)."""
    if q.size == 0 or not _gpus_are_sm90():
        return 0
    parts = _split_parts(q, k, cfg, few_rows)
    if parts == 0:
        return 0
    g, MB, heads = _split_shape(q, k, cfg)
    layouts = math.prod(indptr.shape[:-1]) or 1
    plane = _plane_floats(cfg.block_r * g, q.shape[-1])
    return 4 * layouts * (MB + parts) + 4 * layouts * parts + heads * parts * plane


def _fwd_workspace_words(q, k, indptr, indices, cfg: Config) -> int:
    """The CUDA forward's workspace (csrc/cuda/fwd/params.h fwd_workspace_words): with few block rows the row split's
    area (or none: BSATTN_FWD_SPLIT=0), else the sweep's bit maps where R * g <= 16, else the row split's area."""
    if _few_rows_split(q, k, cfg):
        return _fwd_split_words(q, k, indptr, cfg)
    return _fwd_sweep_table_words(q, k, indptr, indices, cfg) or _fwd_split_words(q, k, indptr, cfg)


def _cuda_fwd_call(q, k, v, indptr, indices, kv_lens, q_offset, *, cfg: Config):
    """The CUDA forward's third result is its workspace (the sweep's bit maps or the row split's area; empty where it
    runs neither), dropped. With kv_lens its block rows list only blocks with a key below the length (live_blocks)."""
    indptr, indices = live_row_lists(indptr, indices, kv_lens, q, cfg.block_c, k.shape[1])
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:-1], jax.numpy.float32),
           jax.ShapeDtypeStruct((_fwd_workspace_words(q, k, indptr, indices, cfg),), jax.numpy.uint32))
    o, lse, _ = jax.ffi.ffi_call("bsattn_fwd_cuda", out)(q, k, v, indptr, indices, kv_lens, q_offset,
                                                          **ffi_attributes(cfg))
    return o, lse


def _cuda_call_rule(call):
    """A CUDA lowering through a jnp function of the operands (a hidden workspace result, a column view)."""
    lower_call = mlir.lower_fun(call, multiple_results=True)

    def lower(ctx, *args, cfg: Config):
        _check_cuda(ctx.avals_in[0])
        _check_cuda_sizes(ctx.avals_in, cfg, backward=call is _cuda_bwd_call)
        return lower_call(ctx, *args, cfg=cfg)

    return lower


def _cuda_bwd_call(q, k, v, do, lse, delta, indptr, indices, kv_lens, q_offset, *, cfg: Config):
    """The CUDA backward also takes the layout's column view (dk / dv walk block columns), built here in
    XLA from the row view on the device: no host round trip, no dense mask; for the one-pass kernel each column's
    rows in walk_order where that pays (_reorders_walks); none where the row-oriented backward runs. Its fourth
    result is the dq workspace (empty: the deterministic backward), dropped here. With kv_lens the row view lists only
    blocks with a key below the length (live_blocks), one layout per batch element; the column view comes from the
    layout as given (one for the batch: built once, broadcast), its columns past a length skipped by the kernels."""
    layout_ip, layout_ix = indptr, indices  # (as given: one layout for the batch or one per element)
    indptr, indices = live_row_lists(indptr, indices, kv_lens, q, cfg.block_c, k.shape[1])
    ws_words = _dq_workspace_words(q, k, indptr, indices, cfg)
    if _rows_words(q, k, cfg) and os.environ.get("BSATTN_BWD_COL_VIEW") != "always":
        # the row-oriented backward runs (its workspace is given) and never reads the column view: none is built (the
        # handler checks that it runs). BSATTN_BWD_COL_VIEW=always builds it anyway (A / B).
        col_indptr = col_rows = col_order = jax.numpy.zeros(indptr.shape[:-1] + (0,), jax.numpy.int32)
    else:
        # A layout shared by the batch keeps one column view (built once, broadcast) where the row lists hold one
        # per batch element: for every column with a live key it lists the same rows, and the columns past a length
        # are key tiles the column kernels skip (bwd/common.cuh live_keys). Sessions 48-50: same step time, B x fewer sorts.
        view_ip, view_ix = (layout_ip, layout_ix) if layout_ix.shape[0] != indices.shape[0] else (indptr, indices)
        col_indptr, col_rows = column_view(view_ip, view_ix, -(-k.shape[1] // cfg.block_c))
        col_order = column_order(col_indptr)
        if _reorders_walks(q, k, cfg, ws_words):
            col_rows = walk_order(col_indptr, col_rows, indptr.shape[-1] - 1)
        # (to the lists' batch: a no-op where the view was built from them)
        col_indptr, col_rows, col_order = (jax.numpy.broadcast_to(x, indices.shape[:-1] + x.shape[-1:])
                                           for x in (col_indptr, col_rows, col_order))
    out = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    out += (jax.ShapeDtypeStruct((ws_words,), jax.numpy.float32),)
    dq, dk, dv, _ = jax.ffi.ffi_call("bsattn_bwd_cuda", out)(q, k, v, do, lse, delta, indptr, indices, kv_lens,
                                                            q_offset, col_indptr, col_rows, col_order,
                                                            **ffi_attributes(cfg))
    return dq, dk, dv


mlir.register_lowering(bsattn_bwd_ffi_p, _ffi_rule("bsattn_bwd_cpu", "cpu"), platform="cpu")
mlir.register_lowering(bsattn_bwd_ffi_p, _cuda_call_rule(_cuda_bwd_call), platform="cuda")
mlir.register_lowering(bsattn_fwd_ffi_p, _ffi_rule("bsattn_fwd_cpu", "cpu"), platform="cpu")
mlir.register_lowering(bsattn_fwd_ffi_p, _cuda_call_rule(_cuda_fwd_call), platform="cuda")
for _platform in ("cpu", "cuda"):
    mlir.register_lowering(bsattn_fwd_p, _partitioned_rule(fwd_partitioned, _platform), platform=_platform)
    mlir.register_lowering(bsattn_bwd_p, _partitioned_rule(bwd_partitioned, _platform), platform=_platform)

# custom_partitioning needs the device assignment while lowering; jax finds that out by looking for these
# primitives in the jaxpr (private API, hence the guard: without it a mesh-less lowering still works).
try:
    from jax._src import dispatch as _dispatch
    _dispatch.prim_requires_devices_during_lowering.update((bsattn_fwd_p, bsattn_bwd_p))
except (ImportError, AttributeError):  # pragma: no cover
    pass
