"""jax_bsattn.export: a jitted function that calls the op, exported, serialised and deserialised, computes what the
function computes (forward, gradients, the VJP of an exported forward, a symbolic batch); the CUDA lowering for a
named GPU from a machine without it; the sharded op refused with a message (the shard_map form: test_sharding.py);
on the GPU, the artifact for the local GPU and the portable one against the float32 reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

import jax_bsattn as jb
from jax_bsattn import layouts, lowering
from conftest import check_forward, check_gradients, random_problem

pytest.importorskip("flatbuffers")   # jax's serialisation needs it (a test extra)


def _roundtrip(exported):
    return jax_export.deserialize(exported.serialize())


def _problem(dtype=jnp.float32, D=16, B=2):
    rng = np.random.default_rng(3)
    q, k, v = random_problem(rng, batch=(B,), M=48, N=64, Hq=4, Hk=2, D=D, dtype=dtype)
    lay = layouts.union(layouts.sliding_window((48, 64), 8, 24), layouts.random((48, 64), 8, 2, batch_shape=(2,)))
    kw = dict(causal=True, kv_lens=jnp.array([61, 40][:B], jnp.int32))
    return (q, k, v), lay, kw


def _fwd_and_grad(lay, kw):
    fwd = jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, lay, **kw))
    loss = lambda q, k, v: jnp.sum(jnp.sin(jb.block_sparse_attention(q, k, v, lay, **kw).astype(jnp.float32)))
    return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _bitwise_equal(got, want):
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    return len(got) == len(want) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want))


def test_forward_and_gradients_round_trip():
    args, lay, kw = _problem()
    fwd, grad = _fwd_and_grad(lay, kw)
    for f in (fwd, grad):
        exported = jb.export(f)(*args)
        assert exported.platforms == ("cpu",)
        assert _bitwise_equal(_roundtrip(exported).call(*args), f(*args))


def test_plain_jax_export_needs_the_disabled_checks():
    args, lay, kw = _problem()
    fwd, _ = _fwd_and_grad(lay, kw)
    with pytest.raises(ValueError, match="bsattn_fwd_cpu"):      # jax's own refusal of an unknown custom call
        jax_export.export(fwd)(*args)
    exported = jax_export.export(fwd, disabled_checks=jb.exporting.disabled_checks())(*args)
    assert _bitwise_equal(_roundtrip(exported).call(*args), fwd(*args))


def test_vjp_of_an_exported_forward():
    args, lay, kw = _problem()
    fwd, grad = _fwd_and_grad(lay, kw)
    restored = jax_export.deserialize(jb.export(fwd)(*args).serialize(vjp_order=1))
    loss = lambda q, k, v: jnp.sum(jnp.sin(restored.call(q, k, v).astype(jnp.float32)))
    assert _bitwise_equal(jax.grad(loss, argnums=(0, 1, 2))(*args), grad(*args))


def test_symbolic_batch():
    args, _, _ = _problem(B=1)
    lay = layouts.sliding_window((48, 64), 8, 24)      # (one layout for any batch)
    fwd = jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, lay, causal=True))
    b, = jax_export.symbolic_shape("b")
    specs = [jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype) for x in args]
    restored = _roundtrip(jb.export(fwd)(*specs))
    for B in (1, 3):
        xs = [jnp.concatenate([x] * B) * (1 + jnp.arange(B, dtype=x.dtype)[:, None, None, None]) for x in args]
        assert _bitwise_equal(restored.call(*xs), fwd(*xs)), B


def _workspace_sizes(text, target="bsattn_fwd_cuda"):
    """The sizes of the workspace (the last result) of each call of an FFI target in a lowered module's text."""
    lines = [l for l in text.splitlines() if f"custom_call @{target}(" in l]
    return [int(re.findall(r"tensor<(\d+)x(?:ui|i|f)\d+>", l.split(" -> ")[-1])[-1]) for l in lines]


def test_cuda_lowering_for_a_named_gpu():
    # A decode step (one row, 8K listed keys of 32K): on H100 / H200 the forward splits its keys over the GPU, which
    # needs a workspace; the portable lowering gives none. Lowered here for CUDA, whatever GPU this machine has.
    B, N, Hq, Hk, D = 1, 32768, 8, 2, 128
    lay = layouts.random((1, N), (1, 64), 128, seed=0)
    fwd = jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, lay))
    specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((B, 1, Hq, D), (B, N, Hk, D), (B, N, Hk, D))]
    sizes = {gpu: _workspace_sizes(jb.export(fwd, gpu=gpu, platforms=("cpu", "cuda"))(*specs).mlir_module())
             for gpu in ("portable", "sm90", "local")}
    assert sizes["portable"] == [0] and len(sizes["sm90"]) == 1 and sizes["sm90"][0] > 0, sizes
    assert sizes["local"] == (sizes["sm90"] if lowering._local_gpus_are_sm90() else sizes["portable"]), sizes
    # jit afterwards lowers for the local GPUs again (the named target's lowering is not reused from a cache)
    assert lowering.gpu_target is None
    local = jax.jit(fwd).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert _workspace_sizes(local) == sizes["local"]
    # the CPU half of the two-platform artifact runs here
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.standard_normal(s.shape), jnp.float32).astype(jnp.bfloat16) for s in specs]
    restored = _roundtrip(jb.export(fwd, gpu="sm90", platforms=("cpu", "cuda"))(*specs))
    with jax.default_device(jax.devices("cpu")[0]):
        assert _bitwise_equal(restored.call(*xs), fwd(*xs))


def test_cuda_vjp_lowered_for_the_named_gpu():
    # The VJP jax exports on request (Exported.vjp, serialize(vjp_order=1)) is lowered for the same GPU: on H100 / H200
    # the backward adds dq with float atomics into a workspace of q's size at least; the portable lowering's holds only
    # the column split's partial sums.
    B, N, Hq, Hk, D = 1, 1024, 8, 2, 128
    lay = layouts.random((N, N), (64, 64), 4, seed=0)
    fwd = jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, lay))
    specs = [jax.ShapeDtypeStruct((B, N, h, D), jnp.bfloat16) for h in (Hq, Hk, Hk)]
    sizes = {gpu: _workspace_sizes(jb.export(fwd, gpu=gpu, platforms=("cuda",))(*specs).vjp().mlir_module(),
                                   "bsattn_bwd_cuda") for gpu in ("portable", "sm90")}
    assert len(sizes["portable"]) == len(sizes["sm90"]) == 1, sizes
    assert sizes["sm90"][0] >= B * N * Hq * D > sizes["portable"][0], sizes


def test_bad_gpu_names_the_argument():
    with pytest.raises(ValueError, match="gpu must be one of"):
        jb.export(jax.jit(lambda x: x), gpu="h100")


@pytest.mark.gpu
@pytest.mark.parametrize("gpu", ["local", "portable"])
def test_exported_on_the_gpu(gpu):
    """Artifacts for this GPU and portable ones (the kernels that need no Hopper workspace, on an H100 too), restored
    from their bytes, held to the float32 reference like the op; the local one also equals the jitted function."""
    args, lay, kw = _problem(jnp.bfloat16, D=64)
    fwd, grad = _fwd_and_grad(lay, kw)
    with_lse = jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, lay, return_lse=True, **kw))
    # the forward's artifact carries its VJP (first order: the op has no second derivative, so grad's has none)
    restored = [jax_export.deserialize(jb.export(f, gpu=gpu, platforms=("cuda",))(*args).serialize(
        vjp_order=int(f is fwd))) for f in (with_lse, fwd, grad)]
    as_op = lambda r: (lambda q, k, v, layout, **_: r.call(q, k, v))     # the artifact in the op's place
    check_forward(*args, lay, op=as_op(restored[0]), **kw)
    check_gradients(*args, lay, op=as_op(restored[1]), **kw)     # through the exported VJP
    if gpu == "local":
        assert _bitwise_equal(restored[1].call(*args), fwd(*args))
        assert _bitwise_equal(restored[2].call(*args), grad(*args))
