"""Backward pass (CPU kernel) against jax.grad of the float32 reference."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb
from conftest import check_gradients, low_lse_problem, random_mask, random_problem


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
