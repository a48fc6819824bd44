"""Backward pass (CPU kernel) against jax.grad of the float32 reference."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb
from conftest import check_gradients, layout_with_duplicates, low_lse_problem, random_mask, random_problem


def _cases():
    for n, (R, C) in enumerate(itertools.product((1, 3, 16, 64), (1, 5, 16, 64))):
        yield pytest.param(R, C, (1, 2, 4)[n % 3], (16, 64, 128)[(n // 3) % 3], bool(n % 2),
                           (None, 15.0)[(n // 2) % 2], id=f"R{R}-C{C}-n{n}")


@pytest.mark.parametrize("R,C,g,D,causal,softcap", list(_cases()))
def test_grid(R, C, g, D, causal, softcap):
    rng = np.random.default_rng(R * 100 + C)
    M, N = 2 * R + 5, 2 * C + 9 + (C < 5) * 30
    MB, NB = -(-M // R), -(-N // C)
    mask = random_mask(rng, (), MB, NB, 0.6)
    mask[-1] = False
    layout = jb.BlockSparseLayout.from_block_mask(mask, (R, C), (M, N))
    q, k, v = random_problem(rng, M=M, N=N, Hq=2 * g, Hk=2, D=D)
    check_gradients(q, k, v, layout, causal=causal, logits_soft_cap=softcap)


@pytest.mark.parametrize("R,C,g", [(1, 16, 1), (1, 3, 4), (2, 8, 2)])
def test_dkdv_rows_gathered_across_block_rows(R, C, g):
    """The CPU backward's dk / dv pass gathers the query rows that list a block column across block rows, up to 64
    packed rows a chunk (attention_cpu.h gathered_chunking): columns listed by more rows than that (a chunk full
    mid-walk), blocks listed two and three times (counted as often), out-of-range entries, causal rows that see none
    (N < M) or part of a block, and kv_lens."""
    rng = np.random.default_rng(41 + 10 * R + g)
    M, N, Hk = 150, 120, 2
    layout = layout_with_duplicates(rng, R, C, M, N, 2)
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=g * Hk, Hk=Hk, D=32)
    check_gradients(q, k, v, layout, causal=True, kv_lens=jnp.array([N, 77], jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
    rng = np.random.default_rng(11)
    M, N = 64, 80
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (2,), 4, 5, 0.5), (16, 16), (M, N))
    q, k, v = random_problem(rng, batch=(3,), M=M, N=N, Hq=4, Hk=2, D=64, dtype=dtype)
    check_gradients(q, k, v, layout, causal=True)


@pytest.mark.parametrize("R,C,g,D,dtype", [(16, 2, 2, 64, jnp.float32), (8, 5, 4, 32, jnp.bfloat16),
                                           (4, 16, 1, 16, jnp.float32)])
def test_rows_with_very_low_lse(R, C, g, D, dtype):
    """Every row's lse < -88 (conftest.low_lse_problem): keys a kernel computes but must not count get p = inf."""
    check_gradients(*low_lse_problem(R, C, g, D, dtype))


@pytest.mark.parametrize("scale", [10.0, -10.0])
def test_large_scale(scale):
    """Scale +-10: scores far above a row's log-sum-exp for the keys it does not list."""
    rng = np.random.default_rng(14)
    M, N = 48, 60
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (), 6, 12, 0.4), (8, 5), (M, N))
    q, k, v = random_problem(rng, M=M, N=N, Hq=4, Hk=2, D=32)
    check_gradients(q, k, v, layout, scale=scale, causal=True)


def test_per_batch_layouts():
    rng = np.random.default_rng(12)
    M, N = 24, 40
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (2, 1), 3, 5, 0.5), (8, 8), (M, N))
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=6, Hk=3, D=16)
    check_gradients(q, k, v, layout)


def test_lse_cotangent():
    """Differentiating through the returned log-sum-exp too."""
    import jax

    from jax_bsattn.reference import block_sparse_attention_reference as ref

    rng = np.random.default_rng(13)
    M, N = 30, 30
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (), 4, 4, 0.6), (8, 8), (M, N))
    q, k, v = random_problem(rng, M=M, N=N, Hq=2, Hk=1, D=16)

    def loss(fn):
        def f(q, k, v):
            o, lse = fn(q, k, v, layout, return_lse=True, causal=True)
            return jnp.sum(o * o) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))
        return f

    got = jax.grad(loss(jb.block_sparse_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_garbage_traced_layout_gradients(causal):
    """The backward on layouts made inside jit that break the rules (indptr out of order and out of range,
    out-of-range and negative indices, a block listed twice): the gradients follow the reference's reading of them
    (the clamps, skips, and a duplicate counted twice) as the forward does (test_forward.py)."""
    import jax

    rng = np.random.default_rng(16 + causal)
    M, N, R, C = 50, 45, 10, 9
    MB, NB = 5, 5
    q, k, v = random_problem(rng, M=M, N=N, Hq=4, Hk=2, D=16)
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    for trial in range(3):
        indptr = rng.integers(-4, 16, size=MB + 1).astype(np.int32)
        indices = rng.integers(-3, NB + 3, size=14).astype(np.int32)
        if trial == 0:  # rows in order: block 1 twice and an out-of-range block in row 0, a negative index in row 1
            indptr = np.array([0, 3, 5, 8, 10, 14], np.int32)
            indices[:5] = [1, 1, NB + 2, -1, 0]

        def grads(fn, ip, ix, q, k, v):
            lay = jb.BlockSparseLayout.from_csr(ip, ix, (R, C), (M, N))
            loss = lambda q, k, v: jnp.sum(jnp.where(ct != 0, fn(q, k, v, lay, causal=causal) * ct, 0.0))
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        got = jax.jit(lambda *a: grads(jb.block_sparse_attention, *a))(indptr, indices, q, k, v)
        ref = jax.jit(lambda *a: grads(jb.reference.block_sparse_attention_reference, *a))(indptr, indices, q, k, v)
        for name, a, b in zip(("dq", "dk", "dv"), got, ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)


def test_cpu_gradients_repeatable():
    """The CPU backward (multi-threaded) gives bitwise equal gradients run after run, with and without
    deterministic=True (the flag changes nothing on the CPU)."""
    import jax

    rng = np.random.default_rng(17)
    M, N = 96, 80
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (2,), 6, 10, 0.5), (16, 8), (M, N))
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=8, Hk=2, D=32)

    def grads(det):
        f = lambda q, k, v: jnp.sum(jb.block_sparse_attention(q, k, v, layout, deterministic=det) ** 2)
        return [np.asarray(x) for x in jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)]

    first = grads(False)
    for other in (grads(False), grads(True)):
        for name, a, b in zip(("dq", "dk", "dv"), first, other):
            assert np.array_equal(a, b), f"{name} differs between runs"


@pytest.mark.parametrize("lanes", ["keys", "rows"])
def test_cpu_score_lanes(lanes):
    """Both orientations of the CPU kernels' score tiles on the same shapes (BSATTN_CPU_LANES forces one; by default
    the keys lie across the vector lanes only where the packed rows R x g fill a fraction of a vector): forward and
    gradients against the reference, with R x g from 1 to 32, GQA, causal masks cutting blocks, a soft cap,
    per-sequence key lengths, blocks wider than a vector and narrower, head dims that are not a multiple of it."""
    import os
    import subprocess
    import sys

    script = """
import numpy as np, jax, jax.numpy as jnp, jax_bsattn as jb
from conftest import check_forward, check_gradients, random_mask, random_problem
rng = np.random.default_rng(31)
M, N = 70, 90
for R, C, Hq, Hk, D, causal, cap, dtype in [(1, 16, 4, 4, 40, True, 20.0, jnp.float32),
                                            (2, 5, 4, 2, 64, False, None, jnp.bfloat16),
                                            (1, 1, 2, 2, 16, True, None, jnp.float32),
                                            (3, 37, 6, 3, 48, True, 30.0, jnp.float32),
                                            (16, 16, 4, 2, 24, True, None, jnp.float16)]:
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (2, Hk), -(-M // R), -(-N // C), 0.5), (R, C),
                                                  (M, N))
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=Hq, Hk=Hk, D=D, dtype=dtype)
    kw = dict(causal=causal, logits_soft_cap=cap, kv_lens=jnp.array([N, 61], jnp.int32))
    check_forward(q, k, v, layout, **kw)
    check_gradients(q, k, v, layout, **kw)
print("ok")
"""
    env = dict(os.environ, BSATTN_CPU_LANES=lanes, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_cpu_instruction_set_paths(isa):
    """The CPU kernels' other vector paths (BSATTN_CPU_ISA lowers the one the CPU would take; read once per process,
    so in a subprocess): forward and gradients against the reference in float32, bfloat16 and float16, and every 16-bit
    pattern through the conversions (generic: the integer code; else F16C for float16)."""
    import os
    import subprocess
    import sys

    script = """
import numpy as np, jax, jax.numpy as jnp, jax_bsattn as jb
from conftest import check_forward, check_gradients, random_mask, random_problem
rng = np.random.default_rng(18)
M, N = 70, 90
layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (2,), 5, 6, 0.5), (16, 16), (M, N))
for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=4, Hk=2, D=40, dtype=dtype)
    check_forward(q, k, v, layout, causal=True, logits_soft_cap=20.0)
    check_gradients(q, k, v, layout, causal=True, logits_soft_cap=20.0)
from test_forward import test_every_16bit_value_passes_through
for dtype in (jnp.bfloat16, jnp.float16):
    test_every_16bit_value_passes_through(dtype)
print("ok")
"""
    env = dict(os.environ, BSATTN_CPU_ISA=isa, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
