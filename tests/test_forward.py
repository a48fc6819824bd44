"""Forward pass (CPU kernel) against the float32 reference over the issue's grid."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb
from conftest import check_forward, check_gradients, low_lse_problem, random_mask, random_problem

RS = (1, 2, 3, 16, 64)
CS = (1, 5, 16, 64)
GS = (1, 2, 4)
DS = (16, 64, 128)


def _cases():
    # Every (R, C) pair; g, D, causal and soft cap rotate so that each value meets each other one.
    for n, (R, C) in enumerate(itertools.product(RS, CS)):
        yield pytest.param(R, C, GS[n % 3], DS[(n // 3) % 3], bool(n % 2), (None, 20.0)[(n // 2) % 2],
                           id=f"R{R}-C{C}-g{GS[n % 3]}-D{DS[(n // 3) % 3]}-c{n % 2}-s{(n // 2) % 2}")


@pytest.mark.parametrize("R,C,g,D,causal,softcap", list(_cases()))
def test_grid(R, C, g, D, causal, softcap):
    rng = np.random.default_rng(R * 1000 + C * 10 + g)
    # M != N, neither a multiple of R or C.
    M, N = 2 * R + 7 + (R > 16) * 3, 3 * C + 11 + (C < 5) * 40
    Hk = 2
    MB, NB = -(-M // R), -(-N // C)
    mask = random_mask(rng, (), MB, NB, 0.5)
    mask[0] = False                    # an empty row
    mask[-1] = True                    # a full row
    layout = jb.BlockSparseLayout.from_block_mask(mask, (R, C), (M, N))
    q, k, v = random_problem(rng, M=M, N=N, Hq=g * Hk, Hk=Hk, D=D)
    check_forward(q, k, v, layout, causal=causal, logits_soft_cap=softcap)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes(dtype, causal):
    rng = np.random.default_rng(1)
    M, N, R, C = 90, 70, 16, 16
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (), 6, 5, 0.6), (R, C), (M, N))
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=4, Hk=2, D=64, dtype=dtype)
    check_forward(q, k, v, layout, causal=causal, scale=0.3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_every_16bit_value_passes_through(dtype):
    """With 1 x 1 blocks on the diagonal each query row sees one key, so o = v and dv = do: every bit pattern of the
    dtype (subnormals, the largest values, infinities) is widened to float32 and narrowed back by the kernels
    unchanged, forward (v -> o) and backward (do -> dv); a NaN stays a NaN. (XLA's CPU runs with flush-to-zero, jnp's
    own arithmetic there too, so the bf16 subnormals, float32 subnormals once widened, come out 0; and -0 as +0, the
    sum of the +0 the output starts from and -0.)"""
    N, D = 4096, 16  # N x D = 2^16 patterns
    patterns = jax.lax.bitcast_convert_type(jnp.arange(N * D, dtype=jnp.uint32).astype(jnp.uint16), dtype)
    patterns = patterns.reshape(N, 1, D)
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((N, 1, D)), dtype) for _ in range(3))
    layout = jb.BlockSparseLayout.from_csr(np.arange(N + 1, dtype=np.int32), np.arange(N, dtype=np.int32), (1, 1),
                                           (N, N))
    attend = jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, layout))
    wide = np.asarray(patterns.astype(jnp.float32))
    nan = np.isnan(wide)
    assert nan.sum() > 0 and np.isinf(wide).sum() == 2
    expected = np.where(np.abs(wide) < np.finfo(np.float32).tiny, 0.0, wide)[~nan]
    assert (expected != wide[~nan]).sum() == (254 if dtype == jnp.bfloat16 else 0)

    def check(name, out):
        assert out.dtype == dtype
        got = np.asarray(out.astype(jnp.float32))
        np.testing.assert_array_equal(got[~nan], expected, err_msg=name)
        assert np.isnan(got[nan]).all(), name

    o, vjp = jax.vjp(attend, q, k, patterns)
    check("o", o)
    check("dv", vjp(patterns)[2])
    _, vjp = jax.vjp(attend, q, k, v)  # and with finite v: every pattern as the cotangent
    check("dv (finite v)", vjp(patterns)[2])


@pytest.mark.parametrize("lead", [(), (2,), (2, 1), (3, 2), (2, 3, 2)], ids=str)
def test_layout_broadcast(lead):
    """One layout for all, per KV head, per batch element, per both, and several batch dims."""
    rng = np.random.default_rng(len(lead))
    batch = {(): (2, 3), (2,): (3,), (2, 1): (2,), (3, 2): (3,), (2, 3, 2): (2, 3)}[lead]
    M, N, R, C = 40, 48, 8, 16
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, lead, 5, 3, 0.5), (R, C), (M, N))
    q, k, v = random_problem(rng, batch=batch, M=M, N=N, Hq=4, Hk=2, D=16)
    check_forward(q, k, v, layout)


def test_padded_indices_and_uneven_rows():
    """Layouts stacked per head list different block counts: entries past indptr[-1] are padding."""
    M = N = 64
    indptr = np.array([[0, 1, 3, 3, 4], [0, 4, 4, 6, 8]], np.int32)
    indices = np.array([[2, 0, 3, 1, -7, 99, 5, 5], [0, 1, 2, 3, 1, 2, 0, 3]], np.int32)
    layout = jb.BlockSparseLayout.from_csr(indptr, indices, (16, 16), (M, N))
    q, k, v = random_problem(np.random.default_rng(3), M=M, N=N, Hq=4, Hk=2, D=32)
    check_forward(q, k, v, layout, causal=True)


@pytest.mark.parametrize("R,C,g,D", [(16, 2, 2, 64), (4, 16, 1, 16)])
def test_rows_with_very_low_lse(R, C, g, D):
    """Every row's lse < -88 (conftest.low_lse_problem): o and lse stay finite and exact."""
    check_forward(*low_lse_problem(R, C, g, D, jnp.float32))


def test_all_empty_layout_gives_zero_and_minus_inf():
    layout = jb.BlockSparseLayout.from_csr(np.zeros(6, np.int32), np.zeros(0, np.int32), (8, 8), (33, 20))
    q, k, v = random_problem(np.random.default_rng(4), M=33, N=20, Hq=2, Hk=1, D=16)
    o, lse = jb.block_sparse_attention(q, k, v, layout, return_lse=True)
    assert (np.asarray(o) == 0).all() and np.isneginf(np.asarray(lse)).all()


def test_empty_batch():
    """A batch of 0 sequences: empty outputs and gradients of the right shapes (the partitioned calls' reshapes once
    inferred a size from 0 elements and divided by zero)."""
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((4, 4), bool), (4, 4), (16, 16))
    q, k, v = random_problem(np.random.default_rng(5), batch=(0,), M=16, N=16, Hq=2, Hk=1, D=8)
    f = lambda q, k, v: jb.block_sparse_attention(q, k, v, layout, causal=True, return_lse=True)
    o, lse = jax.jit(f)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0]), argnums=(0, 1, 2)))(q, k, v)
    assert o.shape == q.shape and lse.shape == (0, 16, 2)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_causal_rows_with_nothing_visible():
    """M > N, causal: the first M - N query rows see no key at all -> 0 and -inf, no NaN."""
    M, N = 48, 16
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((3, 1), bool), (16, 16), (M, N))
    q, k, v = random_problem(np.random.default_rng(5), M=M, N=N, Hq=2, Hk=2, D=16)
    o, lse = jb.block_sparse_attention(q, k, v, layout, causal=True, return_lse=True)
    assert (np.asarray(o)[: M - N] == 0).all() and np.isneginf(np.asarray(lse)[: M - N]).all()
    check_forward(q, k, v, layout, causal=True)


def test_garbage_traced_layout_follows_the_clamp_rules():
    """A layout made inside jit is not validated: out-of-range indices are skipped and indptr clamped,
    exactly as the reference reads it, and nothing crashes."""
    import jax

    rng = np.random.default_rng(6)
    M, N, R, C = 50, 45, 10, 9
    MB, NB = 5, 5
    q, k, v = random_problem(rng, M=M, N=N, Hq=2, Hk=1, D=16)
    for trial in range(4):
        indptr = rng.integers(-4, 14, size=MB + 1).astype(np.int32)
        indices = rng.integers(-3, NB + 3, size=12).astype(np.int32)
        if trial == 0:
            indptr = np.sort(indptr)

        def run(ip, ix, q, k, v):
            lay = jb.BlockSparseLayout.from_csr(ip, ix, (R, C), (M, N))
            return (jb.block_sparse_attention(q, k, v, lay, return_lse=True),
                    jb.reference.block_sparse_attention_reference(q, k, v, lay, return_lse=True))

        (o, lse), (o_ref, lse_ref) = jax.jit(run)(indptr, indices, q, k, v)
        np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), rtol=1e-5, atol=1e-5)


def _grads_with_reference(q, k, v, layout, ct, **kw):
    """((dq, dk, dv), outputs) of sum(ct * o) over o's finite entries, for the op and for the reference."""
    def run(op):
        def loss(q, k, v):
            out = op(q, k, v, layout, **kw)
            o = out[0] if isinstance(out, tuple) else out
            return jnp.sum(jnp.where(jnp.isfinite(o), o, 0) * ct), out

        return jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

    return run(jb.block_sparse_attention), run(jb.reference.block_sparse_attention_reference)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("where", ["q", "k", "q_inf"])
def test_nan_input_reaches_the_rows_that_use_it(where, softcap):
    """A NaN query row, or a NaN key in a listed block, makes the rows whose softmax takes it NaN (o and lse), as
    the reference does; other rows keep their values. (The forward once took such a row for an empty one: 0, -inf.)
    So does an inf in q, whose row then holds +inf scores (the reference once read a +inf row maximum as an empty
    row's and gave lse +inf); under a soft cap those are finite (+-cap) and a NaN stays NaN (the CPU tanh once made it
    1). The gradients are NaN exactly where the reference's are (for NaN inputs; an inf in q also meets the zeros of
    the row's saturated or -inf scores, 0 x inf, which the kernels' p (dp - delta) and the reference's autodiff place
    differently: there the values are compared where both are not NaN)."""
    r = np.random.default_rng(3)
    M = N = 48
    q, k, v = (jnp.asarray(r.standard_normal((1, n, 2, 16)), jnp.float32) for n in (M, N, N))
    mask = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]], bool)
    layout = jb.BlockSparseLayout.from_block_mask(mask, (16, 16), (M, N))
    if where == "q":
        q = q.at[0, 5, 1].set(jnp.nan)
    elif where == "q_inf":
        q = q.at[0, 5, 1, 3].set(jnp.inf)
    else:
        k = k.at[0, 20, 0].set(jnp.nan)  # block column 1: block rows 1 and 2 list it, causally from row 20 on
    ct = jnp.asarray(r.standard_normal(q.shape), jnp.float32)
    for causal in (False, True):
        ((dq, dk, dv), (o, lse)), (grads_ref, (ro, rlse)) = _grads_with_reference(
            q, k, v, layout, ct, causal=causal, logits_soft_cap=softcap, return_lse=True)
        nan_rows = np.isnan(np.asarray(rlse))
        if where == "q_inf" and softcap:
            assert not nan_rows.any()
        else:
            assert nan_rows.any() and not nan_rows.all()
        np.testing.assert_array_equal(np.isnan(np.asarray(lse)), nan_rows)
        np.testing.assert_array_equal(np.isnan(np.asarray(o)), np.isnan(np.asarray(ro)))
        np.testing.assert_allclose(np.asarray(o)[~np.isnan(np.asarray(ro))], np.asarray(ro)[~np.isnan(np.asarray(ro))],
                                   rtol=1e-5, atol=1e-5)
        # the keys a NaN row sees (causally) in dk / dv: NaN in the kernel too. With causal=True the reference also
        # spreads it to the hidden keys of the listed block (its products take the whole block, 0 x NaN), the CPU
        # kernels to some of them (dv: 8 of the block's 16 keys on an AVX2 machine, all 16 on earlier CI machines):
        # there the kernel's NaN lie between the two
        seen = layout.to_dense_mask() & (~np.triu(np.ones((M, N), bool), 1) if causal else True)
        must = np.einsum("mh,mn->nh", nan_rows[0].astype(int), seen.astype(int)) > 0   # [N, Hk] (g = 1)
        for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_ref):
            a, b = np.asarray(a), np.asarray(b)
            if where != "q_inf" and causal and name != "dq":
                assert not (np.isnan(a) & ~np.isnan(b)).any(), name
                assert np.isnan(a)[0][must].all(), name
            elif where != "q_inf":
                np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
            both = ~np.isnan(a) & ~np.isnan(b)
            assert both.mean() >= 0.5, name
            np.testing.assert_allclose(a[both], b[both], rtol=2e-4, atol=2e-5, err_msg=name)


def test_inf_in_v_reaches_only_the_rows_that_list_it():
    """An inf in v reaches the output rows whose blocks list its key (+-inf, or NaN where signs meet), in the kernel
    and in the reference; rows that do not list it keep finite values (the reference's dense p @ v once made them
    NaN: 0 x inf). Gradients: NaN / finite where the reference's are."""
    r = np.random.default_rng(4)
    M = N = 48
    q, k, v = (jnp.asarray(r.standard_normal((1, n, 2, 16)), jnp.float32) for n in (M, N, N))
    mask = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]], bool)
    layout = jb.BlockSparseLayout.from_block_mask(mask, (16, 16), (M, N))
    v = v.at[0, 20, 0, 3].set(jnp.inf).at[0, 21, 0, 3].set(-jnp.inf).at[0, 22, 1, 5].set(jnp.inf)
    ct = jnp.asarray(r.standard_normal(q.shape), jnp.float32)
    for causal in (False, True):
        got, ref = _grads_with_reference(q, k, v, layout, ct, causal=causal)
        o, ro = np.asarray(got[1]), np.asarray(ref[1])
        assert np.isfinite(ro[0, :16]).all() and not np.isfinite(ro[0, 16:]).all()   # block row 0 skips column 1
        np.testing.assert_array_equal(o[~np.isfinite(ro)], ro[~np.isfinite(ro)])
        np.testing.assert_allclose(o[np.isfinite(ro)], ro[np.isfinite(ro)], rtol=1e-5, atol=1e-5)
        for name, a, b in zip(("dq", "dk", "dv"), got[0], ref[0]):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=name)
            np.testing.assert_allclose(a[np.isfinite(b)], b[np.isfinite(b)], rtol=2e-4, atol=2e-5, err_msg=name)


def test_blocks_far_wider_than_the_sequence():
    """C = 2^30 over N = 32 keys: the CPU kernels size their scratch by min(C, N) (by C: gigabytes a thread at 2^22,
    terabytes here) and the reference repeats a block min(C, N) times."""
    q, k, v = random_problem(np.random.default_rng(6), M=32, N=32, Hq=2, Hk=1, D=16)
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((4, 1), bool), (8, 1 << 30), (32, 32))
    check_forward(q, k, v, layout, causal=True)
    check_gradients(q, k, v, layout, causal=True)


def test_nan_cotangent_at_rows_that_see_nothing_stays_out_of_the_gradients():
    """Causal, M > N: rows 0-23 see no key (o = 0, lse -inf), rows 16-23 in the block row of live rows 24-31. A NaN
    cotangent there (e.g. the gradient of a log of o behind a where) changes nothing: o does not depend on q, k, v
    there, so the gradients are the reference's and those of a zero cotangent (the kernels' p = 0 once met it: 0 x
    NaN in dv, and through delta in dk)."""
    M, N = 40, 16
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((3, 1), bool), (16, 16), (M, N))
    q, k, v = random_problem(np.random.default_rng(8), M=M, N=N, Hq=4, Hk=2, D=16)
    ct = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)
    nan_ct = ct.at[:M - N].set(jnp.nan)
    lse_ct = jnp.zeros(q.shape[:-1], jnp.float32).at[:M - N].set(jnp.nan)
    for op in (jb.block_sparse_attention, jb.reference.block_sparse_attention_reference):
        (o, lse), vjp = jax.vjp(lambda q, k, v: op(q, k, v, layout, causal=True, return_lse=True), q, k, v)
        assert (np.asarray(o)[:M - N] == 0).all() and np.isneginf(np.asarray(lse)[:M - N]).all()
        want = vjp((ct.at[:M - N].set(0), jnp.zeros_like(lse_ct)))
        for got in (vjp((nan_ct, jnp.zeros_like(lse_ct))), vjp((ct, lse_ct))):
            for name, a, b in zip(("dq", "dk", "dv"), got, want):
                assert np.isfinite(np.asarray(a)).all(), (op.__name__, name)
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=name)


def test_saturated_soft_cap_passes_no_gradient_to_the_scores():
    """Every score is at least 100 caps from 0: tanh is 1 in float32 and the cap's factor 1 - t^2 exactly 0, so dq and
    dk are 0, as the reference's (the CPU tanh once stopped at 9, where it gave 0.99999994: a factor of 1.2e-7)."""
    M = N = 4
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((1, 1), bool), (4, 4), (M, N))
    q = jnp.zeros((1, M, 1, 4), jnp.float32).at[..., 0].set(1.0)
    k = jnp.zeros((1, N, 1, 4), jnp.float32).at[0, :, 0, 0].set(jnp.array([100.0, -100.0, 200.0, -300.0]))
    v = jnp.asarray(np.random.default_rng(10).standard_normal((1, N, 1, 4)), jnp.float32)
    for op in (jb.block_sparse_attention, jb.reference.block_sparse_attention_reference):
        dq, dk = jax.grad(lambda q, k: jnp.sum(op(q, k, v, layout, scale=1.0, logits_soft_cap=1.0) * v),
                          argnums=(0, 1))(q, k)
        assert not np.asarray(dq).any() and not np.asarray(dk).any(), (op.__name__, dq, dk)


def test_rows_that_see_nothing_stay_zero_beside_inf_values():
    """Causal, M > N: the first rows list a block but see none of its keys; inf in v there leaves them 0 (no 0 x inf),
    while a row that sees other keys as well takes the inf (as the reference and jax.nn.dot_product_attention)."""
    M, N = 48, 16
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((3, 1), bool), (16, 16), (M, N))
    q, k, v = random_problem(np.random.default_rng(7), M=M, N=N, Hq=2, Hk=2, D=16)
    v = v.at[5].set(jnp.inf)  # key 5, every head: seen from row M - N + 5 on
    for op in (jb.block_sparse_attention, jb.reference.block_sparse_attention_reference):
        o = np.asarray(op(q, k, v, layout, causal=True))
        assert (o[: M - N] == 0).all(), op.__name__
        assert not np.isfinite(o[M - N + 5:]).all(), op.__name__
