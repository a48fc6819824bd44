"""Bad arguments get a clear error at trace time that names the argument and the shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb

M, N = 32, 48
LAYOUT = jb.BlockSparseLayout.from_block_mask(np.ones((4, 6), bool), (8, 8), (M, N))


def _qkv(batch=(2,), M=M, N=N, Hq=4, Hk=2, D=16, dtype=jnp.float32):
    return (jnp.ones(batch + (M, Hq, D), dtype), jnp.ones(batch + (N, Hk, D), dtype),
            jnp.ones(batch + (N, Hk, D), dtype))


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda q, k, v: (q.astype(jnp.bfloat16), k, v), TypeError, "share a dtype"),
    (lambda q, k, v: (q.astype(jnp.int32), k, v), TypeError, "q has dtype int32"),
    (lambda q, k, v: (q, k, v[..., :8]), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q[..., :8], k, v), ValueError, "head dim"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), ValueError, "head dim must be at least 1"),
    (lambda q, k, v: (q[..., :3, :], k, v), ValueError, "multiple of KV heads"),
    (lambda q, k, v: (q[0], k, v), ValueError, "batch dims"),
    (lambda q, k, v: (q[:, :, 0], k, v), ValueError, r"\[\*B, seq, heads, head_dim\]|batch dims"),
    (lambda q, k, v: (q[:, :16], k, v), ValueError, "seq_lens"),
])
def test_array_errors(mutate, exc, match):
    q, k, v = mutate(*_qkv())
    with pytest.raises(exc, match=match):
        jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, LAYOUT))(q, k, v)


def test_layout_errors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="BlockSparseLayout"):
        jb.block_sparse_attention(q, k, v, np.ones((4, 6), bool))
    per_3_heads = jb.BlockSparseLayout.from_block_mask(np.ones((3, 4, 6), bool), (8, 8), (M, N))
    with pytest.raises(ValueError, match=r"does not broadcast against \(\*B, Hk\) = \(2, 2\)"):
        jb.block_sparse_attention(q, k, v, per_3_heads)
    too_deep = jb.BlockSparseLayout.from_block_mask(np.ones((1, 1, 1, 4, 6), bool), (8, 8), (M, N))
    with pytest.raises(ValueError, match="does not broadcast"):
        jb.block_sparse_attention(q, k, v, too_deep)


def test_soft_cap_must_be_positive():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="logits_soft_cap"):
        jb.block_sparse_attention(q, k, v, LAYOUT, logits_soft_cap=0.0)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(scale="0.5"), TypeError, "scale must be a real number"),
    (dict(scale=np.ones(2)), TypeError, "scale must be a real number"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(logits_soft_cap=float("inf")), ValueError, "logits_soft_cap must be finite"),
    (dict(logits_soft_cap="30"), TypeError, "logits_soft_cap must be a real number"),
    (dict(scale=1e39), ValueError, "scale must be finite"),  # (inf in float32)
    (dict(scale=10 ** 400), ValueError, "scale must be finite"),  # (no float at all)
    (dict(logits_soft_cap=1e-46), ValueError, "logits_soft_cap must be a positive normal"),  # (0 in float32: no cap)
    (dict(logits_soft_cap=1e-39), ValueError, "logits_soft_cap must be a positive normal"),  # (subnormal: flushed to 0)
    (dict(logits_soft_cap=1e37), ValueError, r"logits_soft_cap must be at most 2\*\*100"),  # (s / c underflows)
    (dict(logits_soft_cap=2.0 ** 100 * (1 + 2 ** -23)), ValueError, r"logits_soft_cap must be at most 2\*\*100"),
    (dict(scale=np.array(True)), TypeError, "scale must be a real number"),  # (not 1.0)
    (dict(scale=jnp.asarray(True)), TypeError, "scale must be a real number"),
    (dict(scale=np.complex64(0.5 + 3j)), TypeError, "scale must be a real number"),  # (not 0.5 and a warning)
    (dict(causal="yes"), TypeError, "causal must be True or False"),
    (dict(causal=None), TypeError, "causal must be True or False"),
    (dict(deterministic=1), TypeError, "deterministic must be True or False"),
    (dict(return_lse="no"), TypeError, "return_lse must be True or False"),
    (dict(context_parallel="rings"), ValueError, "context_parallel must be 'all_gather' or 'ring'"),
    (dict(context_parallel=None), ValueError, "context_parallel must be 'all_gather' or 'ring'"),
])
def test_attribute_errors(kw, exc, match):
    """The op's attributes are compiled into the kernels: each error names its argument."""
    q, k, v = _qkv()
    for op in (jb.block_sparse_attention, jb.reference.block_sparse_attention_reference):
        with pytest.raises(exc, match=match):
            op(q, k, v, LAYOUT, **kw)


def test_the_largest_soft_cap_is_no_cap():
    """At the largest cap accepted, 2^100, the scores (spread over a few units here, some near 0) come out as without a
    cap, within float32 rounding: s / c underflows for none that counts (at 1e37, refused, the ones below 0.1 did)."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in _qkv())
    for op in (jb.block_sparse_attention, jb.reference.block_sparse_attention_reference):
        capped = op(q, k, v, LAYOUT, logits_soft_cap=2.0 ** 100)
        np.testing.assert_allclose(capped, op(q, k, v, LAYOUT), rtol=1e-6, atol=1e-6)


def test_traced_flag_is_a_clear_error():
    q, k, v = _qkv()
    f = jax.jit(lambda q, k, v, c: jb.block_sparse_attention(q, k, v, LAYOUT, causal=c))
    with pytest.raises(TypeError, match="causal must be a concrete True or False"):
        f(q, k, v, True)


def test_traced_scale_is_a_clear_error():
    q, k, v = _qkv()
    f = jax.jit(lambda q, k, v, s: jb.block_sparse_attention(q, k, v, LAYOUT, scale=s))
    with pytest.raises(TypeError, match="scale must be a concrete number"):
        f(q, k, v, 0.5)
    g = jax.jit(lambda q, k, v, c: jb.block_sparse_attention(q, k, v, LAYOUT, logits_soft_cap=c))
    with pytest.raises(TypeError, match="logits_soft_cap must be a concrete number"):
        g(q, k, v, 30.0)


def test_numpy_scalars_are_accepted():
    """NumPy scalars and concrete 0-d arrays are numbers (and NumPy bools switches) like their Python forms."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), x.shape) for i, x in enumerate(_qkv()))
    want = jb.block_sparse_attention(q, k, v, LAYOUT, scale=0.25, causal=True)
    assert not np.allclose(np.asarray(want), np.asarray(jb.block_sparse_attention(q, k, v, LAYOUT)))
    for scale, causal in ((np.float32(0.25), np.bool_(True)), (jnp.asarray(0.25), True), (0.25, np.array(True)),
                          (0.25, jnp.asarray(True))):
        got = jb.block_sparse_attention(q, k, v, LAYOUT, scale=scale, causal=causal)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_numpy_float64_arrays_are_taken_as_jit_takes_them():
    """float64 NumPy q, k, v: jax's canonical dtype (float32 without x64) eagerly as under jit (eager calls once
    refused them), in the op and in the reference."""
    q, k, v = (np.asarray(jax.random.normal(jax.random.PRNGKey(i), x.shape), np.float64) for i, x in enumerate(_qkv()))
    for op in (jb.block_sparse_attention, jb.reference.block_sparse_attention_reference):
        want = op(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), LAYOUT)
        for f in (op, jax.jit(op)):
            got = f(q, k, v, LAYOUT)
            assert got.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_cuda_lowering_rejects_unsupported_head_dim_and_dtype():
    q, k, v = _qkv(D=48, dtype=jnp.bfloat16)
    f = jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, LAYOUT))
    with pytest.raises(ValueError, match=r"head dims \(64, 128, 256\)"):
        f.trace(q, k, v).lower(lowering_platforms=("cuda",))
    q, k, v = _qkv(D=64, dtype=jnp.float32)
    with pytest.raises(TypeError, match="bfloat16"):
        f.trace(q, k, v).lower(lowering_platforms=("cuda",))
