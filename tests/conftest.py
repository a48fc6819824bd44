"""Shared helpers: random problems, the reference-relative tolerance, and the GPU marker."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb
from jax_bsattn.reference import reference_in_dtype


def _has_cuda() -> bool:
    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:
        return False


HAS_CUDA = _has_cuda()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_path_unless_marked_gpu(request):
    """Tests without the gpu marker check the CPU path (float32, any head dim: the CUDA kernels refuse both), so on a
    machine with a GPU they still run on the CPU device; the gpu-marked ones choose their devices themselves."""
    if not HAS_CUDA or "gpu" in request.keywords:
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def custom_call_lines(text, target):
    """The lines of a lowered module's text that call the FFI target `target` (e.g. "bsattn_bwd_cuda")."""
    return [l for l in text.splitlines() if f"custom_call @{target}" in l]


def random_mask(rng, lead, MB, NB, density):
    """A random block mask; density 0 and 1 rows appear too when density is extreme."""
    return rng.random(tuple(lead) + (MB, NB)) < density


def random_problem(rng, *, batch=(), M, N, Hq, Hk, D, dtype=jnp.float32):
    """Fresh random q, k, v (never zeros), scaled so the softmax is neither flat nor one-hot."""
    def draw(shape):
        return jnp.asarray(rng.standard_normal(shape) * 1.5, dtype)
    return draw(tuple(batch) + (M, Hq, D)), draw(tuple(batch) + (N, Hk, D)), draw(tuple(batch) + (N, Hk, D))


def layout_with_duplicates(rng, R, C, M, N, part):
    """A random layout listing NB // part block columns a row, with block row 3 listing a block three times and
    block row 40 // R one block twice plus two out-of-range entries, unvalidated (as a traced layout may be)."""
    MB, NB = -(-M // R), -(-N // C)
    rows = [rng.choice(NB, size=NB // part, replace=False).tolist() for _ in range(MB)]
    rows[3 % MB] += [rows[3 % MB][0], rows[3 % MB][0]]
    rows[40 // R % MB] += [rows[40 // R % MB][-1], -3, NB + 7]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
    indices = np.asarray(sum(rows, []), np.int32)
    return jb.BlockSparseLayout(indptr, indices, (R, C), (M, N), validate=False)


def low_lse_problem(R, C, g, D, dtype=jnp.bfloat16, nb=4, Hk=2):
    """q, k, v, layout where block row i lists only block column i, whose keys score about -16 |u_i|^2 / sqrt(D)
    (-128 or less) against its queries (q = 4 u_i, k = -4 u_i, plus noise): every row's lse < -88, so p = exp(s - lse)
    overflows to inf for any key a kernel computes but must not count (padding keys, whose score is 0; unlisted keys
    of a packed tile, scoring about 0). Those must be masked, not multiplied by 0 (NaN). Deterministic."""
    rng = np.random.default_rng(5)
    M, N, Hq = nb * R, nb * C, Hk * g
    u = rng.standard_normal((nb, Hk, D))
    noise = lambda *shape: 0.3 * rng.standard_normal(shape)
    q = 4 * np.repeat(np.repeat(u, g, axis=1)[:, None], R, axis=1).reshape(M, Hq, D) + noise(M, Hq, D)
    k = -4 * np.repeat(u[:, None], C, axis=1).reshape(N, Hk, D) + noise(N, Hk, D)
    v = rng.standard_normal((N, Hk, D))
    q, k, v = (jnp.asarray(x[None], dtype) for x in (q, k, v))
    return q, k, v, jb.BlockSparseLayout.from_block_mask(np.eye(nb, dtype=bool), (R, C), (M, N))


def rel_err(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    finite = np.isfinite(ref)
    assert (np.isfinite(x) == finite).all(), "non-finite entries differ from the reference"
    assert (x[~finite] == ref[~finite]).all(), "infinite entries differ from the reference"
    num = np.linalg.norm(x[finite] - ref[finite])
    den = np.linalg.norm(ref[finite])
    return num / den if den > 0 else num


def assert_close(name, out, ref32, ref_lowp):
    """The project's criterion: error at most twice the reference's own error in the input dtype, + 1e-4."""
    err = rel_err(out, ref32)
    budget = 2 * rel_err(ref_lowp, ref32) + 1e-4
    assert err <= budget, f"{name}: relative error {err:.3e} > budget {budget:.3e}"
    return err


def assert_lse_close(lse, lse32):
    """lse is float32 in every input dtype, from float32 scores of the inputs as given, so it is held to the float32
    reference alone (budget 1e-4). The reference in a 16-bit dtype rounds its lse to that dtype (bf16: 0.06 near 12),
    a budget that would let an lse off by 0.05 pass."""
    return assert_close("lse", lse, lse32, lse32)


def on_cpu(*xs):
    """References always run on the CPU: XLA's GPU float32 matmuls may use TF32."""
    cpu = jax.devices("cpu")[0]
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, cpu), xs)


def check_forward(q, k, v, layout, op=jb.block_sparse_attention, **kw):
    """Runs the op (jitted; or ``op``, called as the op) and compares o and lse with the float32 reference."""
    o, lse = jax.jit(lambda q, k, v, l: op(q, k, v, l, return_lse=True, **kw))(q, k, v, layout)
    assert o.dtype == q.dtype and o.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:-1]
    args = on_cpu(q, k, v, layout)
    o32, lse32 = reference_in_dtype(*args, return_lse=True, **kw)
    olp = reference_in_dtype(*args, compute_dtype=q.dtype, **kw)
    assert not np.isnan(np.asarray(o, np.float32)).any()
    return assert_close("o", o, o32, olp), assert_lse_close(lse, lse32)


def check_gradients(q, k, v, layout, op_kw=None, op=jb.block_sparse_attention, **kw):
    """jax.grad of the op (or of ``op``, called as the op) against jax.grad of the float32 reference (cotangent:
    random, fixed). op_kw: arguments of the op alone (``deterministic``)."""
    ct = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)

    def loss(fn, **extra):
        def f(q, k, v):
            return jnp.sum(fn(q, k, v, layout, **kw, **extra).astype(jnp.float32) * ct)
        return f

    got = jax.jit(jax.grad(loss(op, **(op_kw or {})), argnums=(0, 1, 2)))(q, k, v)
    cq, ck, cv = on_cpu(q, k, v)
    ref = jax.grad(loss(reference_in_dtype), argnums=(0, 1, 2))(cq, ck, cv)
    lowp = jax.grad(loss(reference_in_dtype, compute_dtype=q.dtype), argnums=(0, 1, 2))(cq, ck, cv)
    return [assert_close(n, g, r, lp) for n, g, r, lp in zip(("dq", "dk", "dv"), got, ref, lowp)]
