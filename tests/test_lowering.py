"""The StableHLO of a CUDA lowering made on this (CPU) machine holds the CUDA custom calls and attributes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb
from conftest import custom_call_lines


def test_cuda_lowering_holds_custom_calls_with_attributes():
    layout = jb.BlockSparseLayout.from_block_mask(np.tril(np.ones((4, 4), bool)), (16, 16), (64, 64))
    q = jnp.ones((2, 64, 8, 128), jnp.bfloat16)
    k = jnp.ones((2, 64, 2, 128), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(jb.block_sparse_attention(q, k, v, layout, causal=True, logits_soft_cap=30.0,
                                                 scale=0.5).astype(jnp.float32))

    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
        lowering_platforms=("cuda",)).as_text()
    fwd, bwd = custom_call_lines(text, "bsattn_fwd_cuda"), custom_call_lines(text, "bsattn_bwd_cuda")
    assert len(fwd) == 1 and len(bwd) == 1, text
    for line in fwd + bwd:
        for attr in ("block_r = 16 : i64", "block_c = 16 : i64", "causal = true", "scale = 5.000000e-01 : f32",
                     "softcap = 3.000000e+01 : f32"):
            assert attr in line, (attr, line)
    assert re.search(r"tensor<2x64x8x128xbf16>.*tensor<1x1x5xi32>", fwd[0])
    assert "cpu" not in " ".join(fwd + bwd)


# Sizes past the CUDA kernels' 32-bit index arithmetic are refused when the CUDA lowering is made (abstract shapes:
# nothing is allocated), naming the size ("... is too large for the CUDA kernels"); the forward takes what only the
# backward refuses (M * Hq); more entries than int32 indptr can address, already by the layout.
_TOO_LARGE = " is too large for the CUDA kernels"


@pytest.mark.parametrize("M,N,R,C,Hq,Hk,nnz,grad,named", [
    (2**26, 1024, 2**20, 2**20, 32, 8, 64, True, "M * Hq (q's rows x heads) = 2147483648" + _TOO_LARGE),
    (2**26, 1024, 2**20, 2**20, 32, 8, 64, False, None),
    (1024, 1024, 16, 16, 8, 2, 2**31, False, "indices has 2147483648 entries in its last dimension"),
    (1024, 2**29 + 1, 16, 2**29, 8, 2, 64, False,
     "ceil(N / C) * C (k's padded sequence length) = 1073741824" + _TOO_LARGE),
    (64, 64, 2**28, 16, 64, 8, 4, False, "R * g (block_r x query heads per KV head) = 2147483648" + _TOO_LARGE)])
def test_cuda_lowering_refuses_sizes_past_int32(M, N, R, C, Hq, Hk, nnz, grad, named):
    def f(q, k, indptr, indices):
        layout = jb.BlockSparseLayout(indptr, indices, (R, C), (M, N))
        out = lambda q, k: jnp.sum(jb.block_sparse_attention(q, k, k, layout).astype(jnp.float32))
        return jax.grad(out, argnums=(0, 1))(q, k) if grad else out(q, k)

    args = (jax.ShapeDtypeStruct((1, M, Hq, 64), jnp.bfloat16), jax.ShapeDtypeStruct((1, N, Hk, 64), jnp.bfloat16),
            jax.ShapeDtypeStruct((-(-M // R) + 1,), jnp.int32), jax.ShapeDtypeStruct((nnz,), jnp.int32))
    lower = lambda: jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    if named is None:
        assert custom_call_lines(lower().as_text(), "bsattn_fwd_cuda")
    else:
        with pytest.raises(ValueError, match=re.escape(named)):
            lower()


# With kv_lens the CUDA lowering hands the kernels per-batch live lists (live_blocks.py): the custom calls' layout
# operands then have the batch's size, not the shared layout's 1; without lengths, with BSATTN_KV_LIVE_LISTS=0, or
# where the lists would pass a quarter of q's bytes (a long shared layout, a large batch), the layout as given.
@pytest.mark.parametrize("B,nnz,env,live", [(3, 5, None, True), (3, 5, "0", False), (64, 2 ** 20, None, False)])
def test_cuda_lowering_live_lists_rule(B, nnz, env, live, monkeypatch):
    if env is None:
        monkeypatch.delenv("BSATTN_KV_LIVE_LISTS", raising=False)
    else:
        monkeypatch.setenv("BSATTN_KV_LIVE_LISTS", env)

    def f(q, k, indptr, indices, kv_lens):
        layout = jb.BlockSparseLayout(indptr, indices, (16, 16), (64, 64))
        out = lambda q, k: jnp.sum(jb.block_sparse_attention(q, k, k, layout, kv_lens=kv_lens).astype(jnp.float32))
        return jax.grad(out, argnums=(0, 1))(q, k)

    args = (jax.ShapeDtypeStruct((B, 64, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((B, 64, 2, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((5,), jnp.int32), jax.ShapeDtypeStruct((nnz,), jnp.int32),
            jax.ShapeDtypeStruct((B,), jnp.int32))
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    lists = f"tensor<{B if live else 1}x1x5xi32>, tensor<{B if live else 1}x1x{nnz}xi32>"
    for call in ("bsattn_fwd_cuda", "bsattn_bwd_cuda"):
        lines = custom_call_lines(text, call)
        assert len(lines) == 1 and lists in lines[0], (call, lists, lines)


# With kv_lens the backward's row lists hold one layout per batch element; a layout shared by the batch keeps one
# column view (built from the layout as given, broadcast), a layout per element one view per element.
@pytest.mark.parametrize("layout_batch", [1, 3])
def test_cuda_backward_column_view_shared_over_batch(layout_batch, monkeypatch):
    from jax_bsattn.lowering import _cuda_bwd_call
    from jax_bsattn.primitives import Config

    monkeypatch.delenv("BSATTN_KV_LIVE_LISTS", raising=False)
    monkeypatch.delenv("BSATTN_BWD_COL_VIEW", raising=False)
    B, nnz = 3, 7
    q = jax.ShapeDtypeStruct((B, 64, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((B, 64, 2, 128), jnp.bfloat16)
    f32 = jax.ShapeDtypeStruct((B, 64, 8), jnp.float32)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    cfg = Config(block_r=16, block_c=16, scale=0.1, softcap=0.0, causal=False)
    call = lambda *a: _cuda_bwd_call(*a, cfg=cfg)
    layout = i32(layout_batch, 1, 5), i32(layout_batch, 1, nnz)
    jaxpr = jax.make_jaxpr(call)(q, k, k, q, f32, f32, *layout, i32(B), i32(0))

    from jax.extend.core import subjaxprs

    def sorted_shapes(jx):  # the operand shapes of every sort (the column view's argsort among them), sub-jaxprs too
        for eqn in jx.eqns:
            if eqn.primitive.name == "sort":
                yield from (v.aval.shape for v in eqn.invars)
        for sub in subjaxprs(jx):
            yield from sorted_shapes(sub)

    shapes = list(sorted_shapes(jaxpr.jaxpr))
    assert shapes and all(s[0] == layout_batch for s in shapes), shapes
    ffi = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "ffi_call"]
    assert len(ffi) == 1 and [v.aval.shape for v in ffi[0].invars[6:8]] == [(B, 1, 5), (B, 1, nnz)]
    assert [v.aval.shape for v in ffi[0].invars[10:]] == [(B, 1, 5), (B, 1, nnz), (B, 1, 4)]


def test_cpu_lowering_uses_cpu_targets():
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((2, 2), bool), (8, 8), (16, 16))
    q = jnp.ones((16, 2, 16), jnp.float32)
    text = jax.jit(lambda q: jb.block_sparse_attention(q, q, q, layout)).trace(q).lower(
        lowering_platforms=("cpu",)).as_text()
    assert "custom_call @bsattn_fwd_cpu" in text


# The sweep backward's rule as lowering.py applies it (it sizes the workspace; csrc/cuda/bwd/params.h
# sm90_sweep_applies decides the same on the device): D = 128, C a power of two within the packed form's rule, the
# layout's capacity at least C / 64 of the block grid, or outside that rule C <= 4 and a capacity of at least 1 / 4;
# its bit map no larger than the layout's indices.
@pytest.mark.parametrize("R,C,g,D,density,swept", [
    (1, 1, 4, 128, 0.25, True), (1, 16, 4, 128, 0.25, True), (1, 16, 4, 128, 0.125, False),
    (1, 8, 4, 128, 0.125, True), (1, 4, 4, 128, 0.0625, True), (16, 1, 4, 128, 0.25, True),
    (1, 1, 4, 64, 0.25, False), (1, 3, 4, 128, 0.25, False), (4, 16, 4, 128, 0.5, False),
    (64, 1, 4, 128, 0.25, True), (64, 1, 4, 128, 0.125, False), (4, 4, 4, 128, 0.25, True),
    (4, 8, 4, 128, 0.5, False), (1, 1, 4, 128, 1 / 64, False)])
def test_sweep_backward_rule(R, C, g, D, density, swept, monkeypatch):
    from jax_bsattn.lowering import _sweep_words
    from jax_bsattn.primitives import Config

    monkeypatch.delenv("BSATTN_BWD_SWEEP", raising=False)
    M = N = 1024
    MB, NB = -(-M // R), -(-N // C)
    q = jax.ShapeDtypeStruct((1, M, 2 * g, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, N, 2, D), jnp.bfloat16)
    indptr = jax.ShapeDtypeStruct((MB + 1,), jnp.int32)
    indices = jax.ShapeDtypeStruct((int(density * MB * NB),), jnp.int32)
    words = _sweep_words(q, k, indptr, indices, Config(R, C, 1.0, 0.0, False))
    assert (words > 0) == swept
    if swept:   # the dup flag (8), two floats a bit word, the row list
        assert words == 8 + 2 * MB * (-(-NB // 64)) + MB
    monkeypatch.setenv("BSATTN_BWD_SWEEP", "0")
    assert _sweep_words(q, k, indptr, indices, Config(R, C, 1.0, 0.0, False)) == 0


# The row-oriented Hopper backward's workspace as lowering.py sizes it (csrc/cuda/bwd/params.h rows_sm90_rule and
# rows_workspace_words: the same rule): D = 64 or 128, C <= 16, R * g >= 128 or R * g = 64 with C <= 8 (D = 128) or 4
# (D = 64), deterministic or not; 64-bit dk and dv sums, four maxima and a flag byte per key row for each, never under
# the dq workspace's minimum the handler checks.
@pytest.mark.parametrize("R,C,g,D,rows", [
    (64, 1, 4, 128, True), (128, 16, 1, 128, True), (16, 16, 8, 128, True), (32, 3, 4, 128, True),
    (16, 16, 4, 128, False), (16, 8, 4, 128, True), (64, 1, 1, 128, True), (16, 9, 4, 128, False),
    (8, 1, 4, 128, False), (64, 17, 4, 128, False), (64, 1, 4, 64, True), (16, 16, 4, 64, False),
    (128, 16, 2, 64, True), (16, 4, 4, 64, True), (16, 8, 4, 64, False), (128, 1, 1, 256, False)])
def test_rows_backward_rule(R, C, g, D, rows, monkeypatch):
    from jax_bsattn import lowering
    from jax_bsattn.primitives import Config

    monkeypatch.setattr(lowering, "_gpus_are_sm90", lambda: True)
    monkeypatch.delenv("BSATTN_BWD_ROWS", raising=False)
    q = jax.ShapeDtypeStruct((2, 1024, 2 * g, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 700, 2, D), jnp.bfloat16)
    want = max(q.size + lowering.DQ_SCHED_WORDS, 4 * k.size + 8 + 4 * ((2 * k.size // D + 15) // 16)) if rows else 0
    for det in (False, True):
        assert lowering._rows_words(q, k, Config(R, C, 1.0, 0.0, False, det)) == want
    monkeypatch.setenv("BSATTN_BWD_ROWS", "0")
    assert lowering._rows_words(q, k, Config(R, C, 1.0, 0.0, False)) == 0
    monkeypatch.setattr(lowering, "_gpus_are_sm90", lambda: False)
    monkeypatch.delenv("BSATTN_BWD_ROWS")
    assert lowering._rows_words(q, k, Config(R, C, 1.0, 0.0, False)) == 0


# Where the row-oriented backward runs (its workspace given) the lowering builds no column view: the custom call gets
# three [LB, LH, 0] operands and the module no sort; elsewhere, or with BSATTN_BWD_COL_VIEW=always, the view.
@pytest.mark.parametrize("R,C,g,rows,LH", [(64, 1, 4, True, 1), (64, 2, 4, True, 2), (16, 16, 4, False, 1)])
def test_row_backward_builds_no_column_view(R, C, g, rows, LH, monkeypatch):
    from jax_bsattn import lowering

    monkeypatch.setattr(lowering, "_gpus_are_sm90", lambda: True)
    for name in ("BSATTN_BWD_ROWS", "BSATTN_BWD_COL_VIEW"):
        monkeypatch.delenv(name, raising=False)
    M = N = 256
    mask = np.random.default_rng(0).random((LH, M // R, N // C)[-2 if LH == 1 else -3:]) < 0.5
    layout = jb.BlockSparseLayout.from_block_mask(mask, (R, C), (M, N))
    q = jnp.ones((1, M, 2 * g, 128), jnp.bfloat16)
    k = jnp.ones((1, N, 2, 128), jnp.bfloat16)

    def bwd_text():
        loss = lambda q, k, v: jnp.sum(jb.block_sparse_attention(q, k, v, layout).astype(jnp.float32))
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
        bwd = custom_call_lines(text, "bsattn_bwd_cuda")
        assert len(bwd) == 1, text
        return bwd[0], "stablehlo.sort" in text

    empty = f"tensor<1x{LH}x0xi32>"
    line, sorts = bwd_text()
    assert (line.count(empty) == 3) == rows and sorts != rows, line
    monkeypatch.setenv("BSATTN_BWD_COL_VIEW", "always")
    line, sorts = bwd_text()
    assert empty not in line and sorts, line


# The forward sweep's workspace as lowering.py sizes it (csrc/cuda/fwd/params.h fwd_sweep_table_words and
# fwd_sm90/launch.cuh fwd_sweep_block_rows: the same rule, less the device's shared memory): R * g <= 16, the layout's
# capacity at least R * g / 32 and 1 / 16 of the block grid, D = 64 or 128, and the bit maps (a bit per key and block
# row, and a flag per block row) no larger than the layout's indices.
@pytest.mark.parametrize("R,C,g,D,density,tabled", [
    (1, 1, 4, 128, 0.25, True), (1, 8, 4, 128, 0.25, True), (1, 16, 4, 128, 0.25, False),
    (2, 1, 4, 64, 0.5, True), (4, 1, 4, 128, 0.25, False), (1, 1, 4, 128, 1 / 32, False),
    (1, 1, 4, 256, 0.25, False), (16, 1, 4, 128, 0.5, False), (1, 2, 1, 128, 0.25, True)])
def test_forward_sweep_table_rule(R, C, g, D, density, tabled, monkeypatch):
    from jax_bsattn import lowering
    from jax_bsattn.primitives import Config

    monkeypatch.setattr(lowering, "_gpus_are_sm90", lambda: True)
    for var in ("BSATTN_FWD_SWEEP", "BSATTN_FWD_SWEEP_TABLE"):
        monkeypatch.delenv(var, raising=False)
    M = N = 1024
    MB, NB = -(-M // R), -(-N // C)
    q = jax.ShapeDtypeStruct((1, M, 2 * g, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, N, 2, D), jnp.bfloat16)
    indptr = jax.ShapeDtypeStruct((2, MB + 1), jnp.int32)   # per-head layouts: two
    indices = jax.ShapeDtypeStruct((2, int(density * MB * NB)), jnp.int32)
    cfg = Config(R, C, 1.0, 0.0, False)
    words = lowering._fwd_sweep_table_words(q, k, indptr, indices, cfg)
    assert words == (2 * MB * (N // 32 + 1) if tabled else 0)
    for var in ("BSATTN_FWD_SWEEP", "BSATTN_FWD_SWEEP_TABLE"):
        monkeypatch.setenv(var, "0")
        assert lowering._fwd_sweep_table_words(q, k, indptr, indices, cfg) == 0
        monkeypatch.delenv(var)


# Where the Hopper one-pass backward gets its columns in walk_order (column_view.py): C > 16 with its dq workspace (at
# least q's size + the counter; not the deterministic pair, whose workspace is at most its splits' areas), and the q, do
# and dq rows of the heads running together (a wave of CTAs: about 264 of 64 keys) at least 64 MiB.
@pytest.mark.parametrize("g,R,C,M,B,ws,reorders", [
    (4, 64, 64, 8192, 1, "one-pass", True), (8, 128, 128, 8192, 1, "one-pass", True),
    (1, 64, 64, 8192, 1, "one-pass", False), (2, 64, 64, 8192, 1, "one-pass", False),
    (1, 64, 64, 32768, 2, "one-pass", False), (4, 64, 64, 32768, 2, "one-pass", True),
    (4, 64, 16, 8192, 1, "one-pass", False), (8, 64, 64, 8192, 1, "none", False), (8, 64, 64, 8192, 1, "pair", False),
    (8, 64, 64, 1024, 1, "one-pass", False)])
def test_walk_order_rule(g, R, C, M, B, ws, reorders, monkeypatch):
    from jax_bsattn import lowering
    from jax_bsattn.primitives import Config

    monkeypatch.delenv("BSATTN_BWD_COL_WALK", raising=False)
    q = jax.ShapeDtypeStruct((B, M, 32, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((B, M, 32 // g, 128), jnp.bfloat16)
    cfg = Config(R, C, 1.0, 0.0, False)
    words = {"none": 0, "pair": q.size // 8, "one-pass": q.size + lowering.DQ_SCHED_WORDS}[ws]
    assert lowering._reorders_walks(q, k, cfg, words) == reorders
    monkeypatch.setenv("BSATTN_BWD_COL_WALK", "0")
    assert not lowering._reorders_walks(q, k, cfg, words)
    monkeypatch.setenv("BSATTN_BWD_COL_WALK", "always")
    assert lowering._reorders_walks(q, k, cfg, words) == (C > 16 and ws == "one-pass")


@pytest.mark.parametrize("R,C,N,B,Hk,LB,LH,words", [
    # partial slots NB // 4: tables 4 L (NB + E) + 4 L E words, sums B Hk E 2 C D floats
    (64, 64, 8192, 1, 4, 1, 1, 4 * (128 + 32) + 4 * 32 + 4 * 32 * 2 * 64 * 128),
    (32, 128, 3000, 2, 2, 2, 2, 4 * 4 * (24 + 6) + 4 * 4 * 6 + 4 * 6 * 2 * 128 * 128),
    (64, 512, 2048, 1, 1, 1, 1, 0),      # NB = 4: one partial slot, no split
    (16, 16, 8192, 1, 4, 1, 1, 0)])      # C <= 16: not the one-pass column kernels
def test_split_words_rule(R, C, N, B, Hk, LB, LH, words, monkeypatch):
    """The column split's workspace (csrc/cuda/bwd/params.h split_workspace_words: the same formula)."""
    from jax_bsattn import lowering
    from jax_bsattn.primitives import Config

    monkeypatch.delenv("BSATTN_BWD_SPLIT", raising=False)
    q = jax.ShapeDtypeStruct((B, N, 4 * Hk, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((B, N, Hk, 128), jnp.bfloat16)
    indptr = jax.ShapeDtypeStruct((LB, LH, -(-N // R) + 1), jnp.int32)
    cfg = Config(R, C, 1.0, 0.0, False)
    assert lowering._split_words(q, k, indptr, cfg) == words
    monkeypatch.setenv("BSATTN_BWD_SPLIT", "0")
    assert lowering._split_words(q, k, indptr, cfg) == 0


@pytest.mark.parametrize("R,M,g,D,B,Hk,LB,LH,words", [
    # partial slots MB // 8: tables 4 L (MB + E) + 4 L E words, the pieces' o and lse B Hk E (R g D + R g padded to 4)
    (16, 8192, 4, 128, 1, 8, 1, 1, 4 * (512 + 64) + 4 * 64 + 8 * 64 * (64 * 128 + 64)),
    (64, 3000, 2, 64, 2, 2, 2, 2, 4 * 4 * (47 + 5) + 4 * 4 * 5 + 4 * 5 * (128 * 64 + 128)),
    (17, 4096, 1, 128, 1, 2, 1, 1, 4 * (241 + 30) + 4 * 30 + 2 * 30 * (17 * 128 + 20)),   # R g = 17: lse padded to 20
    (9, 4096, 2, 64, 1, 2, 1, 1, 4 * (456 + 57) + 4 * 57 + 2 * 57 * (18 * 64 + 20)),      # R g = 18
    (4, 8192, 4, 128, 1, 8, 1, 1, 0),       # R * g = 16: the sweep's workspace, not the split's
    # few block rows (MB < 16), any R * g: E = min(512 // (B Hk), 128, max(2 q.size, 2^24) // plane // (B Hk)), >= 2
    (128, 1024, 4, 128, 1, 4, 1, 1, 4 * (8 + 63) + 4 * 63 + 4 * 63 * (512 * 128 + 512)),  # the 2^24 floats bind
    (1, 1, 4, 128, 1, 8, 1, 1, 4 * (1 + 64) + 4 * 64 + 8 * 64 * (4 * 128 + 4)),          # decode: 512 // 8 slots
    (1, 1, 32, 64, 1, 1, 1, 1, 4 * (1 + 128) + 4 * 128 + 128 * (32 * 64 + 32)),         # MQA: at most 128
    (1024, 8192, 4, 128, 1, 8, 1, 1, 4 * (8 + 15) + 4 * 15 + 8 * 15 * (4096 * 128 + 4096)),  # twice q's f32 binds
    (4, 16, 1, 128, 2, 4, 2, 4, 4 * 8 * (4 + 64) + 4 * 8 * 64 + 8 * 64 * (4 * 128 + 4)),  # per-(batch, head) layouts
    (1, 1, 4, 128, 64, 8, 1, 1, 0),         # 512 heads: one slot each, no split
    (1, 1, 4, 128, 1, 300, 1, 1, 0)])       # 300 heads: one slot each
def test_fwd_split_words_rule(R, M, g, D, B, Hk, LB, LH, words, monkeypatch):
    """The forward's row split workspace (csrc/cuda/fwd/params.h fwd_split_workspace_words: the same formula); where
    R * g > 16, or where there are fewer than 16 block rows, it is the forward's whole workspace."""
    from jax_bsattn import lowering
    from jax_bsattn.primitives import Config

    monkeypatch.delenv("BSATTN_FWD_SPLIT", raising=False)
    monkeypatch.setattr(lowering, "_gpus_are_sm90", lambda: True)
    q = jax.ShapeDtypeStruct((B, M, g * Hk, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((B, M, Hk, D), jnp.bfloat16)
    indptr = jax.ShapeDtypeStruct((LB, LH, -(-M // R) + 1), jnp.int32)
    indices = jax.ShapeDtypeStruct((LB, LH, 64), jnp.int32)
    cfg = Config(R, 16, 1.0, 0.0, False)
    assert lowering._fwd_split_words(q, k, indptr, cfg) == words
    few_rows = -(-M // R) < 16 and words > 0
    if R * g > 16 or few_rows:
        assert lowering._fwd_workspace_words(q, k, indptr, indices, cfg) == words
    if few_rows:  # the pair's dq split keeps the many-row rule
        assert lowering._dq_split_words(q, k, indptr, cfg) == 0
    monkeypatch.setenv("BSATTN_FWD_SPLIT", "0")
    assert lowering._fwd_split_words(q, k, indptr, cfg) == 0
    if few_rows:  # no workspace at all then (the handler takes it empty): not the sweep's maps in its place
        assert lowering._fwd_workspace_words(q, k, indptr, indices, cfg) == 0
    monkeypatch.delenv("BSATTN_FWD_SPLIT")
    monkeypatch.setenv("BSATTN_FWD_KERNEL", "mma")  # the mma.sync kernel does not split
    assert lowering._fwd_split_words(q, k, indptr, cfg) == 0
    monkeypatch.delenv("BSATTN_FWD_KERNEL")
    monkeypatch.setattr(lowering, "_gpus_are_sm90", lambda: False)
    assert lowering._fwd_split_words(q, k, indptr, cfg) == 0


def _row_split_words(R, g, D, M, heads):
    """The row split's area (fwd/params.h fwd_split_workspace_words), one layout: tables 4 (MB + E) + 4 E, the planes
    heads E (R g D + R g padded to 4), E = MB // 8 partial slots; none where R g <= 16 or E < 2."""
    MB = -(-M // R)
    E = MB // 8
    return 0 if R * g <= 16 or E < 2 else 4 * (MB + E) + 4 * E + heads * E * (R * g * D + -(-R * g // 4) * 4)


@pytest.mark.parametrize("M,deterministic,split", [(8192, True, True), (8192, False, False), (16, True, False)])
def test_pair_split_workspace(M, deterministic, split, monkeypatch):
    """deterministic=True with C > 16 gives the pair's dk / dv kernel the column split's area, and its dq kernel the row
    split's after it, while they are shorter than the one-pass kernels' workspace (the handler tells them apart by
    size; M = 16: no split); without it the one-pass workspace (q's size + the counter) holds the column split's area
    after its dq part."""
    from jax_bsattn import lowering
    from jax_bsattn.primitives import Config

    for name in ("BSATTN_BWD_SPLIT", "BSATTN_BWD_ROWS", "BSATTN_BWD_DQ_SPLIT", "BSATTN_BWD_DQ"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(lowering, "_gpus_are_sm90", lambda: True)
    N = 8192
    q = jax.ShapeDtypeStruct((1, M, 32, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, N, 4, 128), jnp.bfloat16)
    indptr = jax.ShapeDtypeStruct((1, 1, -(-M // 64) + 1), jnp.int32)
    indices = jax.ShapeDtypeStruct((1, 1, 64), jnp.int32)
    cfg = Config(64, 64, 1.0, 0.0, False, deterministic)
    words = lowering._dq_workspace_words(q, k, indptr, indices, cfg)
    split_words = lowering._split_words(q, k, indptr, cfg)
    if deterministic:
        assert words == ((split_words + _row_split_words(64, 8, 128, M, 4)) if split else 0)
        monkeypatch.setenv("BSATTN_BWD_DQ_SPLIT", "0")
        assert lowering._dq_workspace_words(q, k, indptr, indices, cfg) == (split_words if split else 0)
    else:
        assert words == q.size + lowering.DQ_SCHED_WORDS + split_words


def test_pair_dq_split_alone_where_keys_outnumber_queries(monkeypatch):
    """Where the column split's area alone is q's size or more (N > 2 g M), the pair still gets the dq split's area by
    itself (the handler takes exactly that size, bwd/params.h pair_areas)."""
    from jax_bsattn import lowering
    from jax_bsattn.primitives import Config

    for name in ("BSATTN_BWD_SPLIT", "BSATTN_BWD_ROWS", "BSATTN_BWD_DQ_SPLIT", "BSATTN_BWD_DQ"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(lowering, "_gpus_are_sm90", lambda: True)
    M, N = 2048, 65536
    q = jax.ShapeDtypeStruct((1, M, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, N, 8, 128), jnp.bfloat16)
    indptr = jax.ShapeDtypeStruct((1, 1, M // 64 + 1), jnp.int32)
    indices = jax.ShapeDtypeStruct((1, 1, 4096), jnp.int32)
    cfg = Config(64, 64, 1.0, 0.0, False, True)
    cs = lowering._split_words(q, k, indptr, cfg, pair=True)
    ds = _row_split_words(64, 1, 128, M, 8)
    assert cs >= q.size + lowering.DQ_SCHED_WORDS > ds > 0
    assert lowering._dq_workspace_words(q, k, indptr, indices, cfg) == ds
    monkeypatch.setenv("BSATTN_BWD_DQ_SPLIT", "0")
    assert lowering._dq_workspace_words(q, k, indptr, indices, cfg) == 0


@pytest.mark.parametrize("R,C,D,deterministic,sm90,env,cs", [
    # the narrow wgmma dk / dv kernel (8 < C <= 16 at D = 128, every C > 8 at D = 256) takes the column split's area,
    # with or without deterministic=True: tables 4 L (NB + E) + 4 L E, partial sums B Hk E 2 C D (E = NB // 4); the dq
    # kernel the row split's after it (R * g > 16)
    (16, 16, 128, False, True, None, 4 * (512 + 128) + 4 * 128 + 8 * 128 * 2 * 16 * 128),
    (16, 16, 128, True, True, None, 4 * (512 + 128) + 4 * 128 + 8 * 128 * 2 * 16 * 128),
    (16, 12, 256, True, True, None, 4 * (683 + 170) + 4 * 170 + 8 * 170 * 2 * 12 * 256),
    (16, 64, 256, False, True, None, 4 * (128 + 32) + 4 * 32 + 8 * 32 * 2 * 64 * 256),
    (16, 16, 128, False, True, "mma", 0),       # BSATTN_BWD_DKDV=mma: the mma.sync 16-key tile, not split
    (16, 16, 128, False, False, None, 0),       # not an H100 / H200: no narrow kernel, no Hopper dq kernel
    (16, 8, 256, True, True, None, 0),          # C <= 8: the packed mma.sync kernel
    (8, 16, 128, True, True, None, 4 * (512 + 128) + 4 * 128 + 8 * 128 * 2 * 16 * 128),  # R * g = 32: it too
    (4, 16, 128, True, True, None, 4 * (512 + 128) + 4 * 128 + 8 * 128 * 2 * 16 * 128)])  # R g = 16: no dq split
def test_pair_split_workspace_narrow(R, C, D, deterministic, sm90, env, cs, monkeypatch):
    """The deterministic pair's areas: the narrow wgmma dk / dv kernel's column split (bwd_sm90/dkdv_narrow_kernel.cuh,
    bwd/column_split.cuh) where it runs, then the Hopper dq kernel's row split (bwd_sm90/dq_split.cuh); the handler
    takes them by their exact sizes. BSATTN_BWD_DQ_SPLIT=0: the first alone; BSATTN_BWD_SPLIT=0: neither."""
    from jax_bsattn import lowering
    from jax_bsattn.primitives import Config

    for name in ("BSATTN_BWD_SPLIT", "BSATTN_BWD_ROWS", "BSATTN_BWD_DKDV", "BSATTN_BWD_SWEEP", "BSATTN_BWD_DQ_SPLIT",
                 "BSATTN_BWD_DQ"):
        monkeypatch.delenv(name, raising=False)
    if env:
        monkeypatch.setenv("BSATTN_BWD_DKDV", env)
    monkeypatch.setattr(lowering, "_gpus_are_sm90", lambda: sm90)
    M = N = 8192
    q = jax.ShapeDtypeStruct((1, M, 32, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, N, 8, D), jnp.bfloat16)
    indptr = jax.ShapeDtypeStruct((1, 1, -(-M // R) + 1), jnp.int32)
    indices = jax.ShapeDtypeStruct((1, 1, 4096), jnp.int32)
    cfg = Config(R, C, 1.0, 0.0, False, deterministic)
    ds = _row_split_words(R, 4, D, M, 8) if sm90 else 0
    assert lowering._dq_workspace_words(q, k, indptr, indices, cfg) == cs + ds
    monkeypatch.setenv("BSATTN_BWD_DQ_SPLIT", "0")
    assert lowering._dq_workspace_words(q, k, indptr, indices, cfg) == cs
    monkeypatch.setenv("BSATTN_BWD_SPLIT", "0")
    assert lowering._dq_workspace_words(q, k, indptr, indices, cfg) == 0
