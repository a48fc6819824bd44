"""Device check and timing of the CUDA backward kernel through the raw FFI target `bsattn_bwd_cuda`.

    python3 csrc/cuda/bwd/check_bwd.py [--lib libbsattn_bwd_dev.so] [--quick] [--no-check] [--no-time]
                                       [--sanitize] [--mock] [--out DIR]

Builds nothing. The handler comes from --lib (a shared library exporting `bsattn_bwd_cuda_dev`, see
dev/build_dev.sh; registered through ctypes + jax.ffi.pycapsule) or, without --lib, from an importable
`_bsattn_cuda` module whose registrations() holds "bsattn_bwd_cuda". jax_bsattn/column_view.py and layout.py are
imported by file path (the package's compiled CPU module need not import here).

Correctness: fresh random inputs; the layout goes through monotone_indptr and column_view exactly as the Python
side will pass it; reference = jax.grad of a dense float32 jnp attention (mask and multiplicities from the BSR
layout, exactly as csrc/README.md reads it), run on the CPU device, with loss sum(o * do) + sum(lse * dlse); the
kernel gets the reference's lse and delta = rowsum(do * o) - dlse. Pass when, for each of dq, dk, dv,
||x - ref|| / ||ref|| <= 2 * (error of the same grads computed by the reference in the inputs' dtype) + 1e-4, no
NaN / inf anywhere, dq exactly 0 on rows with lse = -inf. Then determinism (two runs bitwise equal), robustness
(garbage column views: must finish without a fault) and the timing grid (M = N = 8192, Hq = 32, D = --head-dim,
128 by default, bf16, density 0.25, every block row the same number of random block columns; R, C in {1, 16, 64,
128}, g in {1, 4, 8}):
bwd ms and useful TFLOP/s = 2.5 * 4 * nnz * R * C * D * Hq / time.
--mock replaces the kernel by a jnp implementation of the contract (dk / dv from the column view): a test of
this harness on a machine without a GPU. With the development library (dev/build_dev.sh), --parts-g times dq and
dk / dv alone (BSATTN_BWD_PARTS) and --tune g:R:C:letters times variants (BSATTN_BWD_TUNE, see launch.cuh), each
in a fresh executable (XLA replays a captured command buffer without calling the handler again).
"""
import argparse, ctypes, importlib.util, itertools, json, math, os, statistics, sys, time
from pathlib import Path

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", False)
REPO = Path(__file__).resolve().parents[3]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_column_view_mod = _load("_bsattn_column_view", REPO / "jax_bsattn" / "column_view.py")
column_view, column_order = _column_view_mod.column_view, _column_view_mod.column_order
monotone_indptr = _load("_bsattn_layout", REPO / "jax_bsattn" / "layout.py").monotone_indptr
_common = _load("_bsattn_check_common", REPO / "csrc" / "cuda" / "dev" / "check_common.py")
DT, case_inputs, count_matrix, draw_scale, make_layout, rel = (
    _common.DT, _common.case_inputs, _common.count_matrix, _common.draw_scale, _common.make_layout, _common.rel)
CPU = jax.devices("cpu")[0]


def register(lib):
    if lib:
        handle = ctypes.CDLL(os.path.abspath(lib))
        jax.ffi.register_ffi_target("bsattn_bwd_cuda", jax.ffi.pycapsule(handle.bsattn_bwd_cuda_dev), platform="CUDA")
        return f"lib {lib}"
    import _bsattn_cuda
    regs = _bsattn_cuda.registrations()
    if "bsattn_bwd_cuda" not in regs:
        raise SystemExit("_bsattn_cuda has no bsattn_bwd_cuda: pass --lib")
    for n, c in regs.items():
        jax.ffi.register_ffi_target(n, c, platform="CUDA")
    return "module _bsattn_cuda"


# ---- the call under test ------------------------------------------------------------------------------
# --atomic: give the handler the float32 workspace (the row-oriented Hopper backward's where it applies, else the dq
# workspace of the Hopper one-pass backward); else an empty one (the deterministic kernels)
ATOMIC = False
# the words after the dq workspace's q.size floats (csrc/cuda/bwd/params.h kDqSchedWords, jax_bsattn/lowering.py)
DQ_SCHED_WORDS = 16


def sweep_words(ip, N, C):
    """The sweep form's tables after the dq workspace (csrc/cuda/bwd/params.h sweep_workspace_words), given whenever
    --atomic: the handler takes them only where its rule (and BSATTN_BWD_SWEEP) sends the call to the sweep."""
    LL, MB, NB = ip.shape[0] * ip.shape[1], ip.shape[-1] - 1, -(-N // C)
    return 8 + 2 * LL * MB * (-(-NB // 64)) + MB


def bwd_ffi(q, k, v, do, lse, delta, ip, ix, cip, crw, R, C, scale, softcap, causal):
    words = q.size + DQ_SCHED_WORDS + sweep_words(ip, k.shape[1], C) if ATOMIC else 0
    g = q.shape[-2] // k.shape[-2]
    # the row-oriented kernel's workspace where its rule holds (params.h rows_sm90_rule, lowering.py _rows_words)
    if ATOMIC and q.shape[-1] in (64, 128) and C <= 16 and (
            R * g >= 128 or (R * g >= 64 and C <= (8 if q.shape[-1] == 128 else 4))):
        words = max(words, 4 * k.size + 8 + 4 * ((2 * (k.size // q.shape[-1]) + 15) // 16))
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
           jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((words,), jnp.float32))
    return jax.ffi.ffi_call("bsattn_bwd_cuda", out)(
        q, k, v, do, lse, delta, ip, ix, *(jnp.zeros((0,), jnp.int32),) * 2, cip, crw, column_order(cip),
        # (kv_lens, q_offset: none)
        block_r=np.int64(R), block_c=np.int64(C),
        scale=np.float32(scale), softcap=np.float32(softcap), causal=bool(causal))[:3]


def _dense_counts_jnp(ip, ix, M, N, R, C, rows_view):
    """[LB, LH, M, N] multiplicities from a row view (ip [.., MB+1], ix) or a column view (ip [.., NB+1], ix = rows),
    read with the kernels' clamps (jnp, for --mock)."""
    LB, LH, P1 = ip.shape
    nnz = ix.shape[-1]
    MB, NB = -(-M // R), -(-N // C)
    pos = jnp.arange(nnz)
    s = jnp.clip(ip[..., :-1], 0, nnz)
    e = jnp.clip(ip[..., 1:], s, nnz)
    owner = jnp.sum(pos[None, None, :, None] >= s[..., None, :], axis=-1) - 1  # [LB, LH, nnz] list of each entry
    ok = (owner >= 0) & (pos[None, None] < jnp.take_along_axis(e, jnp.clip(owner, 0, P1 - 2), -1))
    if rows_view:
        br, bc = owner, ix
    else:
        br, bc = ix, owner
    ok = ok & (br >= 0) & (br < MB) & (bc >= 0) & (bc < NB)
    blk = jnp.zeros((LB, LH, MB, NB), jnp.float32)
    li = jnp.arange(LB)[:, None, None]
    hi = jnp.arange(LH)[None, :, None]
    blk = blk.at[li, hi, jnp.clip(br, 0, MB - 1), jnp.clip(bc, 0, NB - 1)].add(ok.astype(jnp.float32))
    return jnp.repeat(jnp.repeat(blk, R, axis=2)[:, :, :M], C, axis=3)[..., :N]


def bwd_mock(q, k, v, do, lse, delta, ip, ix, cip, crw, R, C, scale, softcap, causal):
    """The contract in jnp (f32): dq from the row view, dk / dv from the column view."""
    B, M, Hq, D = q.shape
    N, Hk = k.shape[1], k.shape[2]
    g = Hq // Hk
    f32 = lambda x: x.astype(jnp.float32)
    cr = _dense_counts_jnp(ip, ix, M, N, R, C, True)
    cc = _dense_counts_jnp(cip, crw, M, N, R, C, False)
    if causal:
        cm = (jnp.arange(N)[None, :] <= jnp.arange(M)[:, None] + (N - M))
        cr, cc = cr * cm, cc * cm
    rep = lambda c: jnp.repeat(jnp.broadcast_to(c, (B, Hk, M, N)), g, axis=1)
    qh, doh = f32(q).transpose(0, 2, 1, 3), f32(do).transpose(0, 2, 1, 3)
    kh = jnp.repeat(f32(k).transpose(0, 2, 1, 3), g, axis=1)
    vh = jnp.repeat(f32(v).transpose(0, 2, 1, 3), g, axis=1)
    x = scale * jnp.einsum("bhmd,bhnd->bhmn", qh, kh)
    t = jnp.tanh(x / softcap) if softcap > 0 else x
    s = softcap * t if softcap > 0 else x
    l = lse.transpose(0, 2, 1)[..., None]
    dl = delta.transpose(0, 2, 1)[..., None]
    pe = jnp.where(jnp.isfinite(l), jnp.exp(s - jnp.where(jnp.isfinite(l), l, 0)), 0.0)
    dp = jnp.einsum("bhmd,bhnd->bhmn", doh, vh)
    fac = (1 - t * t) if softcap > 0 else 1.0
    out = []
    for cnt, want in ((cr, "q"), (cc, "kv")):
        p = pe * rep(cnt)
        ds = p * (dp - jnp.where(jnp.isfinite(l), dl, 0)) * fac
        if want == "q":
            out.append((scale * jnp.einsum("bhmn,bhnd->bhmd", ds, kh)).transpose(0, 2, 1, 3))
        else:
            dk = (scale * jnp.einsum("bhmn,bhmd->bhnd", ds, qh)).reshape(B, Hk, g, N, D).sum(2)
            dv = jnp.einsum("bhmn,bhmd->bhnd", p, doh).reshape(B, Hk, g, N, D).sum(2)
            out += [dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)]
    return tuple(o.astype(q.dtype) for o in out)


_jitted = {}


def run_bwd(impl, q, k, v, do, lse, delta, indptr, indices, R, C, scale, softcap, causal):
    """indptr / indices as the user gives them; monotone_indptr and column_view as the Python side does."""
    N = k.shape[1]
    NB = -(-N // C)
    key = (impl, R, C, float(scale), float(softcap), bool(causal), NB)
    if key not in _jitted:
        fn = bwd_mock if impl == "mock" else bwd_ffi

        def f(q, k, v, do, lse, delta, ip, ix):
            ipm = monotone_indptr(ip, ix.shape[-1])
            cip, crw = column_view(ipm, ix, NB)
            return fn(q, k, v, do, lse, delta, ipm, ix, cip, crw, R, C, scale, softcap, causal)
        _jitted[key] = jax.jit(f)
    return _jitted[key](q, k, v, do, lse, delta, indptr, indices)


# ---- reference ----------------------------------------------------------------------------------------
def ref_fwd(q, k, v, cnt, scale, softcap):
    """Dense attention of the contract: q [B,M,Hq,D], k/v [B,N,Hk,D], cnt [LB,LH,M,N] multiplicities."""
    B, M, Hq, D = q.shape
    N, Hk = k.shape[1], k.shape[2]
    g = Hq // Hk
    qh = q.transpose(0, 2, 1, 3)
    kh = jnp.repeat(k.transpose(0, 2, 1, 3), g, axis=1)
    vh = jnp.repeat(v.transpose(0, 2, 1, 3), g, axis=1)
    c = jnp.repeat(jnp.broadcast_to(cnt, (B, Hk, M, N)), g, axis=1)
    x = scale * jnp.einsum("bhmd,bhnd->bhmn", qh, kh)
    s = softcap * jnp.tanh(x / softcap) if softcap > 0 else x
    live = c > 0
    sl = jnp.where(live, s + jnp.log(jnp.where(live, c, 1)).astype(s.dtype), -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(sl, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0)
    e = jnp.exp(sl - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    ls = jnp.where(l > 0, l, 1)
    o = jnp.einsum("bhmn,bhnd->bhmd", e / ls, vh)
    lse = jnp.where(l[..., 0] > 0, jnp.log(ls[..., 0]) + m[..., 0], -jnp.inf)
    return o.transpose(0, 2, 1, 3), lse.transpose(0, 2, 1)


def _ref_all(q, k, v, do, dlse, cnt, scale, softcap):
    def loss(q, k, v):
        o, lse = ref_fwd(q, k, v, cnt, scale, softcap)
        return (jnp.sum((o * do).astype(jnp.float32))
                + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0).astype(jnp.float32) * dlse))
    (o, lse) = ref_fwd(q, k, v, cnt, scale, softcap)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return o, lse, grads


_ref_jit = jax.jit(_ref_all, static_argnames=("scale", "softcap"))


def reference(q, k, v, do, dlse, cnt, scale, softcap, dtype):
    """o, lse, (dq, dk, dv) of the dense reference computed in `dtype` on the CPU device."""
    with jax.default_device(CPU):
        cast = lambda x: jax.device_put(jnp.asarray(np.asarray(x, np.float32)).astype(dtype), CPU)
        o, lse, g = _ref_jit(cast(q), cast(k), cast(v), cast(do), jax.device_put(jnp.asarray(dlse), CPU),
                             jax.device_put(jnp.asarray(cnt, dtype), CPU), scale=float(scale), softcap=float(softcap))
        return (np.asarray(o.astype(jnp.float32)), np.asarray(lse.astype(jnp.float32)),
                tuple(np.asarray(x.astype(jnp.float32)) for x in g))


def check_case(rng, cfg, impl):
    B, M, N, Hk, g, D = cfg["B"], cfg["M"], cfg["N"], cfg["Hk"], cfg["g"], cfg["D"]
    R, C, causal, softcap = cfg["R"], cfg["C"], cfg["causal"], cfg["softcap"]
    Hq = Hk * g
    ndt, jdt, indptr, indices, q, k, v = case_inputs(rng, cfg)
    do = rng.standard_normal((B, M, Hq, D)).astype(ndt)
    dlse = (rng.standard_normal((B, M, Hq)) * (0.5 if cfg.get("dlse", True) else 0.0)).astype(np.float32)
    scale = draw_scale(rng, cfg)
    ipm = np.asarray(monotone_indptr(jnp.asarray(indptr), indices.shape[-1]))
    cnt = count_matrix(ipm, indices, M, N, R, C, causal, dtype=np.float32)
    res = dict(cfg, scale=scale)
    if M > 0 and N > 0:
        o32, lse32, (rq, rk, rv) = reference(q, k, v, do, dlse, cnt, scale, softcap, jnp.float32)
        _, _, (lq, lk, lv) = reference(q, k, v, do, dlse, cnt, scale, softcap, jdt)
    else:
        o32 = np.zeros((B, M, Hq, D), np.float32)
        lse32 = np.full((B, M, Hq), -np.inf, np.float32)
        rq, rk, rv = (np.zeros(x.shape, np.float32) for x in (q, k, v))
        lq, lk, lv = rq, rk, rv
    delta = (np.sum(o32 * do.astype(np.float32), axis=-1) - dlse).astype(np.float32)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(do), jnp.asarray(lse32), jnp.asarray(delta),
            jnp.asarray(indptr), jnp.asarray(indices))
    dq, dk, dv = (np.asarray(x.astype(jnp.float32)) for x in run_bwd(impl, *args, R, C, scale, softcap, causal))
    res["nan"] = bool(any(not np.isfinite(x).all() for x in (dq, dk, dv)))
    empty = ~np.isfinite(lse32)
    res["empty_rows"] = int(empty.sum())
    res["empty_ok"] = bool(np.all(dq[empty] == 0))
    ok = not res["nan"] and res["empty_ok"]
    for name, x, r, lo in (("dq", dq, rq, lq), ("dk", dk, rk, lk), ("dv", dv, rv, lv)):
        res["err_" + name] = rel(x, r)
        res["lowp_" + name] = rel(lo, r)
        ok = ok and res["err_" + name] <= 2 * res["lowp_" + name] + 1e-4
    res["ok"] = bool(ok)
    return res


def case_list(quick):
    Rs, Cs, gs, Ds = [1, 3, 16, 64, 128], [1, 5, 16, 64, 128], [1, 4, 8], [64, 128, 256]
    cases = []
    reps = 1 if quick else 2
    i = 0
    for rep in range(reps):
        for R, C in itertools.product(Rs, Cs):
            i += 1
            g = gs[(i + rep) % 3]
            D = Ds[(i // 3 + rep) % 3]
            kind = (i + 2 * rep) % 6
            Hk = 1 + (i % 2)
            M = int(max(1, R * (2 + (i * 7 + rep) % 4) - (i % 3) * (R > 1)))
            N = int(max(1, C * (3 + (i * 5 + rep) % 5) + (i % 4) - 1)) if C < 100 else int(C * 3 + 13)
            if R == 1:
                M = 40 + i % 7
            if C == 1:
                N = 60 + i % 5
            cases.append(dict(
                R=R, C=C, g=g, D=D, B=1 + (kind == 3), Hk=Hk, dtype="f16" if (i + rep) % 4 == 3 else "bf16", M=M, N=N,
                causal=bool((i + rep) % 3 == 0), softcap=20.0 if (i + rep) % 5 == 1 else 0.0,
                per_head=kind in (1, 3, 5), per_batch=kind == 3, garbage=kind in (2, 5), dup=kind == 4))
    base = dict(B=1, Hk=1, dtype="bf16", causal=False, softcap=0.0, per_head=False, per_batch=False, garbage=False)
    edge = [
        dict(R=16, C=16, g=4, D=128, Hk=2, M=200, N=0, name="N=0"),
        dict(R=16, C=16, g=4, D=128, B=2, Hk=2, M=100, N=90, per_head=True, per_batch=True, nnz0=True, name="nnz=0"),
        dict(R=64, C=64, g=4, D=128, Hk=2, M=256, N=512, causal=True, name="causal N>M"),
        dict(R=64, C=64, g=1, D=128, Hk=2, M=512, N=200, causal=True, softcap=30.0, per_head=True, garbage=True,
             name="causal N<M cap (empty rows)"),
        dict(R=128, C=128, g=8, D=64, dtype="f16", M=300, N=700, p_empty=0.0, name="dense-ish f16"),
        dict(R=2, C=3, g=3, D=128, B=2, Hk=3, M=77, N=91, causal=True, per_head=True, per_batch=True, garbage=True,
             dup=True, name="g=3 odd dup"),
        dict(R=1, C=1, g=8, D=128, M=24, N=600, p_empty=0.0, name="R=C=1 long rows"),
        dict(R=32, C=1, g=2, D=256, Hk=2, M=100, N=300, name="R*g=64 D256"),
        dict(R=40, C=8, g=2, D=128, M=120, N=400, scale=3.0, name="R*g=80 big scale"),
        dict(R=64, C=16, g=5, D=64, dtype="f16", M=130, N=500, causal=True, name="R*g=320 split"),
        dict(R=128, C=200, g=1, D=128, M=256, N=650, causal=True, name="C=200 two key tiles, short last col"),
        dict(R=16, C=128, g=4, D=128, Hk=2, M=300, N=700, causal=True, softcap=20.0, per_head=True, garbage=True,
             name="C=128 D128 causal cap garbage (sm90 wide tile)"),
        dict(R=64, C=256, g=2, D=128, dtype="f16", M=200, N=900, name="C=256 f16 (sm90 wide tile)"),
        dict(R=32, C=128, g=4, D=128, B=2, Hk=2, M=150, N=600, causal=True, per_batch=True,
             name="C=128 B=2, M not a multiple of R (sm90 dq tensor map)"),
        dict(R=64, C=128, g=1, D=128, M=10, N=400, name="M < 64 / g: a box past M (sm90 dq tensor map)"),
        dict(R=1, C=128, g=64, D=128, M=30, N=300, p_empty=0.0, name="g = 64: boxes of 64 heads (sm90 dq tensor map)"),
        dict(R=16, C=128, g=4, D=128, B=2, Hk=2, M=7, N=300, per_batch=True, causal=True,
             name="M < R, batch 2 (sm90 dq tensor map)"),
        dict(R=64, C=128, g=2, D=128, B=2, Hk=2, M=50, N=500, per_head=True, garbage=True, dup=True,
             name="duplicate and garbage entries (sm90 dq tensor map)"),
        dict(R=8, C=192, g=8, D=128, M=100, N=500, causal=True, name="C=192: half last tile (sm90 narrow tile)"),
        dict(R=100, C=130, g=2, D=256, Hk=2, M=230, N=300, softcap=15.0, per_head=True, name="D256 C=130"),
        dict(R=16, C=64, g=4, D=128, M=64, N=256, p_empty=0.0, scale=-0.2, name="negative scale"),
        dict(R=16, C=16, g=1, D=64, M=0, N=100, name="M=0 (dk, dv zero)"),
        dict(R=64, C=64, g=2, D=128, Hk=2, M=256, N=256, dlse=False, softcap=5.0, name="cap 5, dlse 0"),
        dict(R=64, C=1, g=4, D=64, Hk=2, M=300, N=500, causal=True, per_head=True, garbage=True,
             name="row-oriented D=64 causal, per-head garbage"),
        # packed small blocks (C <= 8): merged column lists, windows of 2048 block rows, multiplicities
        dict(R=1, C=1, g=1, D=64, M=4500, N=90, p_empty=0.5, maxk=20, name="pack: 3 windows"),
        dict(R=1, C=2, g=2, D=128, M=4200, N=4150, causal=True, p_empty=0.3, maxk=4, name="pack: 3 windows causal"),
        dict(R=2, C=2, g=4, D=128, Hk=2, M=300, N=200, per_head=True, garbage=True, dup=2, name="pack: C=2 dup x3 garb"),
        dict(R=16, C=3, g=8, D=128, M=200, N=100, causal=True, softcap=10.0, name="pack: C=3 g=8 cap"),
        dict(R=64, C=8, g=1, D=64, dtype="f16", M=256, N=300, dup=True, name="pack: C=8 f16 dup"),
        dict(R=128, C=1, g=4, D=128, B=2, M=256, N=64, per_batch=True, name="pack: R*g=512 C=1"),
        dict(R=1, C=4, g=2, D=128, M=2600, N=64, maxk=3, p_empty=0.9, name="pack: sparse rows 2 windows"),
        dict(R=3, C=5, g=3, D=128, Hk=2, M=100, N=97, dlse=False, name="pack: C=5 N not multiple"),
        dict(R=16, C=1, g=1, D=64, M=0, N=40, name="pack: M=0"),
        dict(R=4, C=1, g=2, D=128, M=40, N=30, p_empty=0.0, dup=19, name="pack: a block listed 20 times (2 passes)"),
        dict(R=2, C=4, g=1, D=64, M=30, N=40, dup=40, garbage=True, name="pack: 41 copies + garbage (3 passes)"),
        # head dim 256: the same kernel in two passes (dv, then dk), windows of 1024 block rows
        dict(R=16, C=1, g=4, D=256, Hk=2, M=200, N=300, causal=True, garbage=True, name="pack D=256: C=1 causal garb"),
        dict(R=3, C=3, g=2, D=256, B=2, Hk=2, dtype="f16", M=70, N=95, per_head=True, per_batch=True, softcap=20.0,
             dup=2, name="pack D=256: C=3 f16 cap dup x3 per-batch"),
        dict(R=1, C=2, g=1, D=256, M=2500, N=40, p_empty=0.3, maxk=5, name="pack D=256: 3 windows"),
        dict(R=64, C=8, g=1, D=256, M=200, N=300, scale=10.0, name="pack D=256: C=8 scale 10"),
        # head dim 256, C > 8 on an H100 / H200: narrow-column wgmma dk / dv in 16-key chunks, wgmma dq (R * g > 16)
        dict(R=16, C=40, g=4, D=256, Hk=2, M=200, N=330, causal=True, garbage=True, name="D=256 narrow: C=40 garb"),
        dict(R=64, C=16, g=2, D=256, dtype="f16", M=230, N=250, softcap=20.0, dup=2, name="D=256 narrow: C=16 f16 dup"),
        dict(R=128, C=128, g=1, D=256, B=2, M=300, N=400, per_head=True, scale=10.0, name="D=256 narrow: 128x128 s10"),
        # compact small blocks (C <= 2, R * g >= 256, D = 128): windows of 32 block rows, groups of 16 keys
        dict(R=64, C=1, g=4, D=128, Hk=2, M=4480, N=300, causal=True, per_head=True, garbage=True, dup=2,
             name="compact: C=1 3 windows causal dup x3 garbage"),
        dict(R=128, C=2, g=2, D=128, dtype="f16", M=300, N=333, softcap=10.0, name="compact: C=2 f16 cap"),
        dict(R=64, C=2, g=4, D=128, B=2, M=300, N=500, per_batch=True, p_empty=0.0, dup=19,
             name="compact: a block listed 20 times"),
        dict(R=80, C=1, g=4, D=128, M=200, N=3000, p_empty=0.0, name="compact: R*g=320 (a half tile), 47 CTAs"),
        # 8 < C <= 16: the 16-key column kernel
        dict(R=16, C=16, g=4, D=128, Hk=2, M=300, N=1000, causal=True, per_head=True, garbage=True, dup=2,
             name="C=16 causal dup x3 garbage"),
        dict(R=64, C=12, g=2, D=128, dtype="f16", M=200, N=500, softcap=10.0, name="C=12 f16 cap"),
        dict(R=64, C=16, g=1, D=128, M=256, N=200, p_empty=0.0, dup=19, name="C=16 a block listed 20 times"),
        dict(R=32, C=14, g=4, D=64, B=2, M=200, N=300, per_batch=True, causal=True, name="C=14 D=64 batch 2"),
        # scores of unlisted keys far above the row's log-sum-exp: their p overflows, and must be masked, not
        # multiplied by 0 (packed and compact kernels)
        dict(R=16, C=2, g=2, D=128, M=200, N=400, scale=10.0, name="pack: scale 10, unlisted keys' p overflows"),
        dict(R=40, C=8, g=2, D=64, M=120, N=400, scale=10.0, name="pack: C=8 D=64 scale 10"),
        dict(R=64, C=1, g=4, D=128, M=256, N=300, scale=10.0, dup=1, name="compact: scale 10"),
    ]
    return cases + [dict(base, **e) for e in edge]


def determinism(rng, impl):
    """Same inputs twice: bitwise equal dq, dk, dv (no atomics anywhere); with --atomic dk and dv only (dq's
    largest difference is reported)."""
    out = []
    for (R, C, g, D, M, N, causal) in [(64, 64, 4, 128, 1024, 1024, True), (16, 16, 8, 64, 512, 700, False),
                                       (128, 128, 1, 256, 512, 512, False), (1, 5, 4, 128, 300, 400, False),
                                       (16, 128, 4, 128, 512, 1024, True),
                                       (64, 1, 4, 128, 512, 600, True), (16, 16, 4, 128, 512, 1000, True),
                                       (1, 1, 4, 128, 512, 700, True),  # (the sweep where its rule holds)
                                       (16, 2, 4, 256, 300, 500, True)]:
        Hk = 2
        Hq = Hk * g
        MB, NB = -(-M // R), -(-N // C)
        ip, ix = make_layout(rng, MB, NB, 1, Hk, maxk=max(1, NB // 3))
        q, do = (jnp.asarray(rng.standard_normal((1, M, Hq, D)), jnp.bfloat16) for _ in range(2))
        k, v = (jnp.asarray(rng.standard_normal((1, N, Hk, D)), jnp.bfloat16) for _ in range(2))
        lse = jnp.asarray(rng.uniform(3, 6, (1, M, Hq)), jnp.float32)
        delta = jnp.asarray(rng.standard_normal((1, M, Hq)), jnp.float32)
        a = run_bwd(impl, q, k, v, do, lse, delta, jnp.asarray(ip), jnp.asarray(ix), R, C, 0.1, 0.0, causal)
        b = run_bwd(impl, q, k, v, do, lse, delta, jnp.asarray(ip), jnp.asarray(ix), R, C, 0.1, 0.0, causal)
        eq = [np.array_equal(np.asarray(x).view(np.uint16), np.asarray(y).view(np.uint16)) for x, y in zip(a, b)]
        same = all(eq[1:] if ATOMIC else eq)
        dq_diff = float(np.max(np.abs(np.asarray(a[0], np.float32) - np.asarray(b[0], np.float32)), initial=0.0))
        out.append(dict(R=R, C=C, g=g, D=D, M=M, N=N, causal=causal, bitwise_equal=bool(same), dq_bitwise=bool(eq[0]),
                        dq_max_diff=dq_diff))
        print(f"determinism R={R} C={C} g={g} D={D}: {'bitwise equal' if same else 'DIFFERENT'}"
              + (f" (dk, dv; dq {'equal' if eq[0] else f'max diff {dq_diff:.2e}'})" if ATOMIC else ""), flush=True)
    return out


def robustness(rng, impl):
    """Garbage column views and layouts straight into the FFI (no monotone_indptr / column_view): must finish."""
    res = []
    for (R, C, g, D) in [(3, 5, 4, 64), (64, 1, 2, 128), (16, 64, 1, 128), (1, 16, 8, 256), (128, 128, 1, 128),
                         (64, 1, 4, 128), (16, 16, 4, 128)]:
        B, Hk, M, N = 2, 2, 130, 150
        Hq = Hk * g
        MB, NB = -(-M // R), -(-N // C)
        nnz = int(rng.integers(1, 40))
        big = [-2 ** 31, -1, 2 ** 31 - 1, nnz + 1, MB, NB, 10 ** 6]
        gen = lambda shape: np.where(rng.random(shape) < 0.3, rng.choice(big, shape),
                                     rng.integers(-2, max(MB, NB, nnz) + 3, shape)).astype(np.int32)
        ip, ix, cip, crw = gen((B, Hk, MB + 1)), gen((B, Hk, nnz)), gen((B, Hk, NB + 1)), gen((B, Hk, nnz))
        q, do = (jnp.asarray(rng.standard_normal((B, M, Hq, D)), jnp.bfloat16) for _ in range(2))
        k, v = (jnp.asarray(rng.standard_normal((B, N, Hk, D)), jnp.bfloat16) for _ in range(2))
        lse = jnp.asarray(rng.uniform(3, 6, (B, M, Hq)), jnp.float32)
        delta = jnp.asarray(rng.standard_normal((B, M, Hq)), jnp.float32)
        fn = bwd_mock if impl == "mock" else bwd_ffi
        t0 = time.time()
        try:
            outs = jax.block_until_ready(jax.jit(lambda *a: fn(*a, R, C, 0.1, 0.0, True))(
                q, k, v, do, lse, delta, *(jnp.asarray(x) for x in (ip, ix, cip, crw))))
            fin = all(bool(np.isfinite(np.asarray(x.astype(jnp.float32))).all()) for x in outs)
            r = dict(R=R, C=C, g=g, D=D, finished=True, finite=fin)
        except Exception as e:  # noqa: BLE001
            r = dict(R=R, C=C, g=g, D=D, finished=False, error=repr(e)[:300])
        print(f"robustness R={R} C={C} g={g} D={D}: {r} ({time.time() - t0:.1f} s)", flush=True)
        res.append(r)
    return res


# ---- timing ----------------------------------------------------------------------------------------------
def timing(impl, cells, reps=3, target_ms=40.0, seq=8192, density=0.25, parts_g=(), tune=None, D=128):
    tune = tune or {}
    Hq = 32
    key = jax.random.PRNGKey(0)
    q, do = (jax.random.normal(jax.random.fold_in(key, i), (1, seq, Hq, D), jnp.bfloat16) for i in range(2))
    rows = []
    layouts = {}
    for (g, R, C, causal) in cells:
        Hk = Hq // g
        MB, NB = -(-seq // R), -(-seq // C)
        if (R, C) not in layouts:
            kk = max(1, int(round(density * NB)))
            u = jax.random.uniform(jax.random.PRNGKey(R * 1000 + C), (MB, NB))
            cols = jnp.sort(jnp.argsort(u, axis=1)[:, :kk].astype(jnp.int32), axis=1)
            ip = jnp.arange(0, (MB + 1) * kk, kk, dtype=jnp.int32)
            layouts[(R, C)] = (ip.reshape(1, 1, MB + 1), cols.reshape(1, 1, -1), MB * kk)
        ip, ix, nnz = layouts[(R, C)]
        k, v = (jax.random.normal(jax.random.fold_in(key, 10 + i), (1, seq, Hk, D), jnp.bfloat16) for i in range(2))
        lse = jnp.full((1, seq, Hq), 8.0, jnp.float32)
        delta = jax.random.normal(jax.random.fold_in(key, 5), (1, seq, Hq), jnp.float32) * 0.1
        cip, crw = jax.block_until_ready(jax.jit(column_view, static_argnums=2)(ip, ix, NB))
        fn = bwd_mock if impl == "mock" else bwd_ffi
        scale = 1.0 / math.sqrt(D)

        def make(calls):
            @jax.jit
            def f(q, k, v, do, lse, delta, ip, ix, cip, crw):
                dk = dv = None
                for _ in range(calls):  # chained through q: strictly in order, nothing to CSE
                    q, dk, dv = fn(q, k, v, do, lse, delta, ip, ix, cip, crw, R, C, scale, 0.0, causal)
                return q, dk, dv
            return f
        args = (q, k, v, do, lse, delta, ip, ix, cip, crw)
        try:
            f1 = make(1)
            jax.block_until_ready(f1(*args))
            t0 = time.perf_counter()
            jax.block_until_ready(f1(*args))
            one = (time.perf_counter() - t0) * 1e3
            calls = int(max(1, min(50, target_ms // max(one, 1e-3))))
            f = make(calls)
            jax.block_until_ready(f(*args))

            def med():
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(*args))
                    ts.append((time.perf_counter() - t0) * 1e3 / calls)
                return statistics.median(ts), (max(ts) - min(ts)) / statistics.median(ts)
            ms, spread = med()
            flops = 2.5 * 4 * nnz * R * C * D * Hq
            row = dict(g=g, R=R, C=C, causal=causal, ms=ms, tflops=flops / ms / 1e9, calls=calls, spread=spread)

            def with_env(var, val):  # a fresh executable: the handler reads the variable when XLA first runs it
                nonlocal f
                os.environ[var] = val
                try:
                    f = make(calls)
                    jax.block_until_ready(f(*args))
                    return med()[0]
                finally:
                    del os.environ[var]
            if impl != "mock":  # dev builds only: each kernel alone (BSATTN_BWD_PARTS), tuning variants
                if g in parts_g:
                    for part in ("dq", "dkdv"):
                        row["ms_" + part] = with_env("BSATTN_BWD_PARTS", part)
                for var in tune.get((g, R, C), ()):
                    row["ms_tune_" + var] = with_env("BSATTN_BWD_TUNE", var)
        except Exception as e:  # noqa: BLE001
            row = dict(g=g, R=R, C=C, causal=causal, error=repr(e)[:300])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=os.environ.get("BSATTN_BWD_LIB"))
    ap.add_argument("--mock", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--atomic", action="store_true", help="give the handler the dq workspace (Hopper one-pass kernel)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--sanitize", action="store_true", help="only the robustness cases and a few small checks")
    ap.add_argument("--cells", default="", help="timing cells g:R:C[:causal],... (default: the peers' grid)")
    ap.add_argument("--density", type=float, default=0.25, help="timing: the fraction of each block row listed")
    ap.add_argument("--head-dim", type=int, default=128, help="timing: the head dim D")
    ap.add_argument("--parts-g", default="4", help="g values whose cells also time dq and dk/dv alone (dev lib)")
    ap.add_argument("--tune", default="", help="g:R:C:letters,... cells also timed with BSATTN_BWD_TUNE=letters")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--c-range", default="", help="lo:hi: only the correctness cases with lo <= C <= hi")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip remaining correctness cases after this")
    a = ap.parse_args()
    global ATOMIC
    ATOMIC = a.atomic
    impl = "mock" if a.mock else "ffi"
    src = "mock" if a.mock else register(a.lib)
    rng = np.random.default_rng(a.seed)
    print("seed", a.seed, "devices", jax.devices(), "handler:", src, flush=True)
    out = {"seed": a.seed}
    t_start = time.time()
    if a.sanitize:
        out["robustness"] = robustness(rng, impl)
        for cfg in case_list(True)[:6]:
            r = check_case(rng, cfg, impl)
            print("sanitize case", "ok" if r["ok"] else "FAIL", {k: r[k] for k in ("R", "C", "g", "D")}, flush=True)
        return
    if not a.no_check:
        results = []
        t0 = time.time()
        c_lo, c_hi = (int(x) for x in a.c_range.split(":")) if a.c_range else (0, 1 << 30)
        for cfg in (c for c in case_list(a.quick) if c_lo <= c["C"] <= c_hi):
            if time.time() - t0 > a.budget_s:
                print("correctness budget spent: remaining cases skipped", flush=True)
                break
            tc = time.time()
            try:
                r = check_case(rng, cfg, impl)
            except Exception as e:  # noqa: BLE001
                r = dict(cfg, ok=False, error=repr(e)[:400])
            results.append(r)
            flag = "ok  " if r["ok"] else "FAIL"
            errs = (" ".join(f'{n} {r["err_" + n]:.1e}/{r["lowp_" + n]:.1e}' for n in ("dq", "dk", "dv"))
                    + f' empty={r["empty_rows"]} empty_ok={int(r["empty_ok"])} nan={int(r["nan"])}'
                    if "err_dq" in r else r.get("error", ""))
            print(f'{flag} R={r["R"]:3} C={r["C"]:3} g={r["g"]} D={r["D"]:3} {r["dtype"]:4} B={r["B"]} Hk={r["Hk"]} '
                  f'M={r["M"]:4} N={r["N"]:4} cau={int(r["causal"])} cap={r["softcap"]:3.0f} ph={int(r["per_head"])} '
                  f'pb={int(r["per_batch"])} garb={int(r["garbage"])} dup={int(r.get("dup", False))} {errs}'
                  + (" [" + r["name"] + "]" if "name" in r else "") + f" ({time.time() - tc:.1f} s)", flush=True)
        out["check"] = results
        nfail = sum(not r["ok"] for r in results)
        worst = max((max(r["err_" + n] / (2 * r["lowp_" + n] + 1e-4) for n in ("dq", "dk", "dv"))
                     for r in results if "err_dq" in r), default=0)
        print(f"CHECK: {len(results) - nfail}/{len(results)} passed in {time.time() - t0:.0f} s; "
              f"worst err / budget = {worst:.2f}", flush=True)
        out["determinism"] = determinism(rng, impl)
        out["robustness"] = robustness(rng, impl)
    if not a.no_time:
        if a.cells:
            cells = []
            for c in a.cells.split(","):
                f = c.split(":")
                cells.append((int(f[0]), int(f[1]), int(f[2]), len(f) > 3 and f[3] == "1"))
        else:
            cells = [(g, R, C, False) for g in (1, 4, 8) for R in (1, 16, 64, 128) for C in (1, 16, 64, 128)]
            cells += [(4, 128, 128, True), (4, 64, 64, True)]
        tune = {}
        for c in a.tune.split(","):
            if c:
                g_, R_, C_, v_ = c.split(":")
                tune.setdefault((int(g_), int(R_), int(C_)), []).append(v_)
        rows = timing(impl, cells, density=a.density, parts_g=tuple(int(x) for x in a.parts_g.split(",") if x),
                      tune=tune, D=a.head_dim)
        out["timing"] = rows
        print(f"\nbwd timing: M = N = 8192, Hq = 32, D = {a.head_dim}, bf16, density {a.density:g}"
              " (useful TFLOP/s = 10 nnz R C D Hq / t)")
        print("  g    R    C  causal      ms   TFLOP/s   dq ms  dkdv ms")
        for r in rows:
            if "ms" in r:
                parts = (f'{r["ms_dq"]:8.3f} {r["ms_dkdv"]:8.3f}' if "ms_dq" in r else "")
                parts += "".join(f' tune {k[8:]}: {v:.3f} ms' for k, v in r.items() if k.startswith("ms_tune_"))
                print(f'{r["g"]:3} {r["R"]:4} {r["C"]:4} {int(r["causal"]):6} {r["ms"]:8.3f} {r["tflops"]:8.1f} {parts}')
            else:
                print(f'{r["g"]:3} {r["R"]:4} {r["C"]:4} {int(r["causal"]):6}  error {r["error"][:80]}')
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "check_bwd_atomic.json" if ATOMIC else "check_bwd.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"total {time.time() - t_start:.0f} s", flush=True)
    if "check" in out:
        bad = (sum(not r["ok"] for r in out["check"]) + sum(not r["bitwise_equal"] for r in out["determinism"])
               + sum(not r["finished"] for r in out["robustness"]))
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
