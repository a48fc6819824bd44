"""jax_bsattn.flax: the NNX module against the reference composed with the same projections, the attention_fn
adapter inside flax.nnx.MultiHeadAttention (and Linen), rotary embedding, gradients, callable layouts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import jax_bsattn as jb
import jax_bsattn.flax as jbf
from jax_bsattn import layouts as L
from jax_bsattn.reference import block_sparse_attention_reference as ref

TOL = dict(rtol=1e-4, atol=1e-5)


def window_layout(n):
    return L.sliding_window(n, 8, 12)


def inputs(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_module_equals_reference_composed_with_its_projections():
    m = jbf.BlockSparseMultiHeadAttention(4, 32, num_kv_heads=2, head_dim=16, out_features=24, use_bias=True,
                                          layout=window_layout, causal=True, logits_soft_cap=20.0,
                                          rngs=nnx.Rngs(0))
    x = inputs((2, 40, 32))
    lay = window_layout(40)

    def proj(lin, x, h):
        return (x @ lin.kernel[...] + lin.bias[...]).reshape(x.shape[:-1] + (h, 16))

    q, k, v = proj(m.query, x, 4), proj(m.key, x, 2), proj(m.value, x, 2)
    o = ref(q, k, v, lay, causal=True, logits_soft_cap=20.0).reshape(2, 40, 64)
    want = o @ m.out.kernel[...] + m.out.bias[...]
    got = nnx.jit(lambda m, x: m(x))(m, x)
    assert got.shape == (2, 40, 24)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def test_module_kv_lens():
    """A right-padded batch: the module's kv_lens is the op's (the reference's on the same projections), and the
    padding's content does not matter."""
    m = jbf.BlockSparseMultiHeadAttention(4, 32, num_kv_heads=2, head_dim=16, layout=L.random(40, 8, 3),
                                          rngs=nnx.Rngs(3))  # (not causal: rows before the length list keys past it)
    x, lens = inputs((2, 40, 32), 3), jnp.asarray([40, 23])
    got = nnx.jit(lambda m, x, n: m(x, kv_lens=n))(m, x, lens)
    q, k, v = (jnp.reshape(x @ lin.kernel[...], (2, 40, h, 16)) for lin, h in ((m.query, 4), (m.key, 2), (m.value, 2)))
    want = ref(q, k, v, L.random(40, 8, 3), kv_lens=lens).reshape(2, 40, 64) @ m.out.kernel[...]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
    noisy = x.at[1, 23:].set(1e3)  # (rows past the length: their own outputs change, not the others')
    np.testing.assert_allclose(np.asarray(m(noisy, kv_lens=lens)[1, :23]), np.asarray(got[1, :23]), **TOL)


def test_module_chunk_of_new_rows():
    """Chunked prefill through the module: the last M rows of each sequence (length L_b), attended against the whole
    cache with q_offset = L_b - M (causal and rotary placed there), give those rows of the whole sequence's output."""
    m = jbf.BlockSparseMultiHeadAttention(4, 32, num_kv_heads=2, head_dim=16, rotary=True, causal=True,
                                          layout=lambda lens: L.block_causal(lens, 8), rngs=nnx.Rngs(5))
    N, M = 40, 8
    x, lens = inputs((2, N, 32), 5), np.array([40, 27])
    whole = nnx.jit(lambda m, x, n: m(x, kv_lens=n))(m, x, jnp.asarray(lens))
    rows = jnp.asarray(lens[:, None] - M + np.arange(M)[None, :])
    chunk = jnp.take_along_axis(x, rows[..., None], axis=1)
    got = nnx.jit(lambda m, c, x, n: m(c, x, kv_lens=n, q_offset=n - M))(m, chunk, x, jnp.asarray(lens))
    want = jnp.take_along_axis(whole, rows[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def test_attend_override_without_kv_lens():
    """A subclass's attend(q, k, v, layout) written before kv_lens existed still runs when kv_lens is not given."""
    class Old(jbf.BlockSparseMultiHeadAttention):
        def attend(self, q, k, v, layout):
            return super().attend(q, k, v, layout)

    m = Old(4, 32, num_kv_heads=2, head_dim=16, layout=window_layout, rngs=nnx.Rngs(4))
    assert m(inputs((2, 40, 32), 4)).shape == (2, 40, 32)


def _with_reference(monkeypatch):
    monkeypatch.setattr(jbf, "block_sparse_attention", ref)


def test_rotary_gradients_and_cross_attention(monkeypatch):
    m = jbf.BlockSparseMultiHeadAttention(4, 32, num_kv_heads=1, kv_features=16, rotary=True, causal=True,
                                          layout=lambda lens: L.block_causal(lens, 8), rngs=nnx.Rngs(1))
    x, ctx = inputs((2, 24, 32), 1), inputs((2, 40, 16), 2)
    loss = lambda m: jnp.sum(jnp.sin(m(x, ctx)))
    got_out = nnx.jit(lambda m: m(x, ctx))(m)
    got = nnx.jit(nnx.grad(loss))(m)
    _with_reference(monkeypatch)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(m(x, ctx)), **TOL)
    want = nnx.grad(loss)(m)
    leaves = jax.tree.leaves(got)
    assert len(leaves) == 4 and all(float(jnp.abs(g).max()) > 0 for g in leaves)
    for a, b in zip(leaves, jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


def test_module_in_zigzag_order():
    # the same module (same parameters) fed the sequence in zigzag order gives its outputs in that order: the rotary
    # positions follow the tokens
    from jax_bsattn.zigzag import to_zigzag
    kw = dict(num_kv_heads=2, rotary=True, causal=True, layout=lambda lens: L.sliding_window(lens, 8, 24))
    natural = jbf.BlockSparseMultiHeadAttention(4, 32, **kw, rngs=nnx.Rngs(3))
    zigzag = jbf.BlockSparseMultiHeadAttention(4, 32, **kw, zigzag_shards=2, rngs=nnx.Rngs(3))
    x = inputs((2, 64, 32), 4)
    np.testing.assert_allclose(np.asarray(zigzag(to_zigzag(x, 2, axis=-2))),
                               np.asarray(to_zigzag(natural(x), 2, axis=-2)), rtol=1e-5, atol=1e-6)


def test_module_refuses_bad_context_parallel_arguments_at_construction():
    for kw, match in ((dict(context_parallel="rings"), "context_parallel must be 'all_gather' or 'ring'"),
                      (dict(zigzag_shards=0), "zigzag_shards must be None or a positive integer"),
                      (dict(sequence_axis=["y"]), "sequence_axis must be None, a mesh axis name or a tuple")):
        with pytest.raises(ValueError, match=match):
            jbf.BlockSparseMultiHeadAttention(4, 32, **kw, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=match):
            jbf.make_attention_fn(L.block_causal(16, 8), **kw)
    with pytest.raises(ValueError, match="zigzag_shards must be None or a positive integer"):
        jbf.make_attention_fn(L.block_causal(16, 8), zigzag_shards=2.0)


def test_rotary_matches_complex_rotation_and_is_relative():
    x = inputs((6, 3, 8), 3)
    pos = jnp.arange(6) * 3 + 1
    got = jbf.apply_rotary(x, pos, theta=100.0)
    freqs = 100.0 ** (-np.arange(4) * 2 / 8)
    z = (np.asarray(x[..., :4]) + 1j * np.asarray(x[..., 4:])) * np.exp(1j * np.asarray(pos)[:, None, None] * freqs)
    np.testing.assert_allclose(np.asarray(got), np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)
    q, k = inputs((1, 1, 8), 4), inputs((1, 1, 8), 5)
    dot = lambda p, r: float(jnp.sum(jbf.apply_rotary(q, jnp.array([p])) * jbf.apply_rotary(k, jnp.array([r]))))
    assert dot(7, 3) == pytest.approx(dot(14, 10), rel=1e-5)


def test_layout_callable_at_two_lengths_and_call_time_override():
    m = jbf.BlockSparseMultiHeadAttention(2, 16, layout=window_layout, causal=True, rngs=nnx.Rngs(2))
    for n in (24, 40):
        assert m(inputs((1, n, 16))).shape == (1, n, 16)
    x = inputs((1, 32, 16))
    full = L.block_causal(32, 8)
    fixed = jbf.BlockSparseMultiHeadAttention(2, 16, causal=True, rngs=nnx.Rngs(2))
    np.testing.assert_allclose(np.asarray(fixed(x, layout=full)), np.asarray(m(x, layout=full)), **TOL)
    assert not np.allclose(np.asarray(m(x)), np.asarray(m(x, layout=full)))    # the window matters here
    with pytest.raises(ValueError, match="no block-sparse layout"):
        fixed(x)
    with pytest.raises(ValueError, match="seq_lens"):
        jbf.BlockSparseMultiHeadAttention(2, 16, layout=full, rngs=nnx.Rngs(0))(inputs((1, 24, 16)))


def _mha(attention_fn=nnx.dot_product_attention, **kw):
    return nnx.MultiHeadAttention(4, 32, num_kv_heads=2, attention_fn=attention_fn, decode=False,
                                  rngs=nnx.Rngs(0), **kw)


def test_attention_fn_in_nnx_multi_head_attention():
    M = 40
    lay = L.union(L.sliding_window(M, 8, 10), L.global_local(M, 8, 0, 1))
    x = inputs((2, M, 32))
    got = nnx.jit(lambda m, x: m(x))(_mha(jbf.make_attention_fn(lay, causal=True)), x)
    causal = np.tril(np.ones((M, M), bool))
    dense = jnp.asarray(np.asarray(lay.to_dense_mask()) & causal)
    want = _mha()(x, mask=dense)                       # flax's own attention with the equivalent dense mask
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)
    # is_causal from the call is honoured.
    via_flag = _mha(jbf.make_attention_fn(lay))(x, is_causal=True)
    np.testing.assert_allclose(np.asarray(via_flag), np.asarray(got), **TOL)
    # dtype is honoured: bf16 compute.
    bf = _mha(jbf.make_attention_fn(lay, causal=True), dtype=jnp.bfloat16)(x)
    assert bf.dtype == jnp.bfloat16


def test_attention_fn_in_zigzag_order():
    # flax's MultiHeadAttention fed the sequence in zigzag order, with the attention_fn told so, gives its outputs
    # in that order
    from jax_bsattn.zigzag import to_zigzag
    lay = L.sliding_window(64, 8, 24)
    x = inputs((2, 64, 32), 6)
    natural = _mha(jbf.make_attention_fn(lay, causal=True))(x)
    zigzag = _mha(jbf.make_attention_fn(lay, causal=True, zigzag_shards=2))(to_zigzag(x, 2, axis=-2))
    np.testing.assert_allclose(np.asarray(zigzag), np.asarray(to_zigzag(natural, 2, axis=-2)), rtol=1e-5, atol=1e-6)


def test_attention_fn_refuses_what_it_cannot_honour():
    lay = L.block_causal(16, 8)
    fn = jbf.make_attention_fn(lay)
    x = inputs((1, 16, 32))
    with pytest.raises(ValueError, match="dense attention mask"):
        _mha(fn)(x, mask=jnp.ones((1, 4, 16, 16), bool))
    with pytest.raises(ValueError, match="dropout"):
        _mha(fn, dropout_rate=0.1)(x, deterministic=False)
    assert _mha(fn, dropout_rate=0.1)(x, deterministic=True).shape == x.shape   # no dropout at inference
    with pytest.raises(ValueError, match="sow_weights"):
        _mha(fn)(x, sow_weights=True)
    dec = nnx.MultiHeadAttention(4, 32, attention_fn=fn, decode=True, rngs=nnx.Rngs(0))
    dec.init_cache((1, 16, 32))
    with pytest.raises(ValueError, match="decode"):
        dec(x[:, :1])
    q = inputs((1, 16, 2, 8))
    with pytest.raises(ValueError, match="bias"):
        fn(q, q, q, bias=jnp.zeros((1, 2, 16, 16)))
    # flax's is_causal is top-left aligned, the op's causal bottom-right: they differ when the lengths do (it once
    # ran with the bottom-right mask)
    kv = inputs((1, 24, 2, 8))
    cross = jbf.make_attention_fn(jb.BlockSparseLayout.from_block_mask(np.ones((2, 3), bool), (8, 8), (16, 24)))
    with pytest.raises(ValueError, match="top-left aligned"):
        cross(q, kv, kv, is_causal=True)
    assert cross(q, kv, kv).shape == q.shape


def test_attention_fn_in_linen():
    linen = pytest.importorskip("flax.linen")
    lay = L.sliding_window(24, 8, 9)
    x = inputs((2, 24, 16))
    bs = linen.MultiHeadDotProductAttention(num_heads=2, attention_fn=jbf.make_attention_fn(lay, causal=True))
    dense = linen.MultiHeadDotProductAttention(num_heads=2)
    params = bs.init(jax.random.key(0), x)
    mask = jnp.asarray(np.asarray(lay.to_dense_mask()) & np.tril(np.ones((24, 24), bool)))
    np.testing.assert_allclose(np.asarray(bs.apply(params, x)), np.asarray(dense.apply(params, x, mask=mask)),
                               rtol=2e-4, atol=2e-5)


def test_import_jax_bsattn_does_not_import_flax():
    import subprocess
    import sys
    code = "import sys, jax_bsattn as jb; assert 'flax' not in sys.modules; jb.flax; assert 'flax' in sys.modules"
    # cwd: the tests folder, so that `-c` imports jax_bsattn as this process did, not the unbuilt source tree
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.abspath(__file__)))


def test_train_lm_example_runs(tmp_path):
    """examples/train_lm.py end to end on a tiny configuration (loss falls; plots and metrics written)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_lm.py")
    spec = importlib.util.spec_from_file_location("train_lm", path)
    train_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_lm)
    m = train_lm.main(["--seq-len", "64", "--block", "16", "--window", "32", "--layers", "1", "--dim", "32",
                       "--heads", "2", "--kv-heads", "1", "--batch", "4", "--steps", "30", "--corpus-mb", "0.2",
                       "--out", str(tmp_path)])
    assert m["final_train_loss"] < m["losses"][0] - 1.0
    assert {"metrics.json", "loss.png", "layout.png"} <= set(os.listdir(tmp_path))


def test_train_lm_data_parallel_matches_one_device(tmp_path):
    """examples/train_lm.py --devices 2 (2 forced host devices, in a subprocess) gives the losses of one device
    with the same global batch: the batch-sharded model and attention compute the same step; so does
    --seq-shards 2 (each sequence split over the two devices: context parallel attention), plain, with --ring, with
    --zigzag and with both."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("train_lm", {os.path.join(root, "examples", "train_lm.py")!r})
t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)
common = ["--seq-len", "64", "--block", "16", "--window", "32", "--layers", "1", "--dim", "32", "--heads", "2",
          "--kv-heads", "1", "--steps", "8", "--corpus-mb", "0.2"]
two = t.main(common + ["--devices", "2", "--batch", "2", "--out", {str(tmp_path / "two")!r}])
one = t.main(common + ["--devices", "1", "--batch", "4", "--out", {str(tmp_path / "one")!r}])
cp = t.main(common + ["--devices", "2", "--seq-shards", "2", "--batch", "4", "--out", {str(tmp_path / "cp")!r}])
ring = t.main(common + ["--devices", "2", "--seq-shards", "2", "--ring", "--batch", "4",
                        "--out", {str(tmp_path / "ring")!r}])
zz = t.main(common + ["--devices", "2", "--seq-shards", "2", "--zigzag", "--batch", "4",
                      "--out", {str(tmp_path / "zz")!r}])
zr = t.main(common + ["--devices", "2", "--seq-shards", "2", "--zigzag", "--ring", "--batch", "4",
                      "--out", {str(tmp_path / "zr")!r}])
print("LOSSES " + json.dumps([two["losses"], one["losses"], two["held_out_loss"], one["held_out_loss"],
                              cp["losses"], cp["held_out_loss"], ring["losses"], ring["held_out_loss"],
                              zz["losses"], zz["held_out_loss"], zr["losses"], zr["held_out_loss"]]))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
    # cwd: the tests folder, so that the subprocess imports jax_bsattn as this process did
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          check=False, cwd=os.path.dirname(os.path.abspath(__file__)))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("LOSSES ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    (two, one, held_two, held_one, cp, held_cp, ring, held_ring, zz, held_zz, zr,
     held_zr) = json.loads(lines[-1][len("LOSSES "):])
    np.testing.assert_allclose(two, one, rtol=1e-4)
    np.testing.assert_allclose(held_two, held_one, rtol=1e-4)
    np.testing.assert_allclose(cp, one, rtol=1e-4)
    np.testing.assert_allclose(held_cp, held_one, rtol=1e-4)
    np.testing.assert_allclose(ring, one, rtol=1e-4)
    np.testing.assert_allclose(held_ring, held_one, rtol=1e-4)
    np.testing.assert_allclose(zz, one, rtol=1e-4)
    np.testing.assert_allclose(held_zz, held_one, rtol=1e-4)
    np.testing.assert_allclose(zr, one, rtol=1e-4)
    np.testing.assert_allclose(held_zr, held_one, rtol=1e-4)


@pytest.mark.gpu
def test_module_on_the_gpu_in_bf16(monkeypatch):
    """The module in bf16 on the CUDA kernels (head dim 64, GQA, rotary, causal): output and parameter gradients
    against the same module on the CPU with the float32 reference, within twice the error of the reference in bf16
    (+ 1e-4), the project's criterion."""
    from conftest import assert_close
    from jax_bsattn.reference import reference_in_dtype

    cuda, cpu = jax.devices("cuda")[0], jax.devices("cpu")[0]
    layout = lambda n: L.sliding_window(n, 16, 48)

    def make(dtype):  # on the CPU: the same parameters for every dtype
        with jax.default_device(cpu):
            return jbf.BlockSparseMultiHeadAttention(4, 256, num_kv_heads=2, head_dim=64, rotary=True, causal=True,
                                                      layout=layout, dtype=dtype, rngs=nnx.Rngs(3))

    x = jax.device_put(inputs((2, 96, 256), 4), cpu)
    loss = lambda m, x: jnp.sum(jnp.sin(m(x).astype(jnp.float32)))
    step = lambda m, x: (m(x), nnx.grad(loss)(m, x))

    graphdef, state = nnx.split(make(jnp.bfloat16))
    on_gpu = nnx.merge(graphdef, jax.device_put(state, cuda))
    out, grads = nnx.jit(step)(on_gpu, jax.device_put(x, cuda))
    assert next(iter(out.devices())).platform == "gpu" and out.dtype == jnp.bfloat16

    with jax.default_device(cpu):
        monkeypatch.setattr(jbf, "block_sparse_attention", ref)
        out32, grads32 = step(make(jnp.float32), x)
        def ref_bf16(*a, deterministic=False, context_parallel="all_gather", zigzag_shards=None, sequence_axis=None,
                     **kw):
            assert zigzag_shards is None and sequence_axis is None   # (the module's, not reference_in_dtype's)
            return reference_in_dtype(*a, compute_dtype=jnp.bfloat16, **kw)
        monkeypatch.setattr(jbf, "block_sparse_attention", ref_bf16)
        out_lowp, grads_lowp = step(make(jnp.bfloat16), x)
    assert_close("out", out, out32, out_lowp)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(grads32))]
    leaves = [jax.tree.leaves(nnx.state(g)) for g in (grads, grads32, grads_lowp)]
    assert len(names) == len(leaves[0]) >= 4
    for name, g, g32, glp in zip(names, *leaves):
        assert_close(name, jax.device_put(g, cpu), g32, glp)
