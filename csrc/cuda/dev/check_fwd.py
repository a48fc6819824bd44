"""Device check of the CUDA forward kernel through the raw FFI target (no jax_bsattn package needed).

    PYTHONPATH=<build>/csrc/cuda python3 csrc/cuda/dev/check_fwd.py [--quick] [--sanitize] [--out DIR]

Correctness: fresh random inputs, a float64 NumPy reference of the contract (csrc/README.md) built from
the BSR layout exactly as the contract reads it (indptr clamps, out-of-range indices skipped, duplicates
counted twice, causal bottom-right), and the same reference in the inputs' precision (scores, P and o
rounded to bf16 / f16) as error budget: pass when ||o - ref|| / ||ref|| <= 2 * err_lowp + 1e-4, lse
likewise, -inf lse exactly where the reference has an empty row, o == 0 there, no NaN anywhere.
--sanitize runs a few small garbage-layout cases without references (for compute-sanitizer).
"""
import argparse, math, itertools, json, os, sys, time

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax
import jax.numpy as jnp

import _bsattn_cuda
from check_common import DT, case_inputs, count_matrix, draw_scale, make_layout, rel  # (this folder)

for _n, _c in _bsattn_cuda.registrations().items():
    jax.ffi.register_ffi_target(_n, _c, platform="CUDA")

def sweep_table_words(M, N, R, indptr, indices):
    """The sweep's workspace as csrc/cuda/fwd/params.h fwd_sweep_table_words sizes it (the launcher uses it only where
    the sweep runs; BSATTN_FWD_SWEEP_TABLE=0 makes each CTA build its own maps instead, for the other path)."""
    MB, words, nnz = -(-M // R), -(-N // 32), indices.shape[-1]
    return math.prod(indptr.shape[:-1]) * MB * (words + 1) if 0 < MB * words <= nnz else 0


def fwd_call(q, k, v, indptr, indices, R, C, scale, softcap, causal):
    B, M, Hq, D = q.shape
    tw = sweep_table_words(M, k.shape[1], R, indptr, indices)
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, M, Hq), jnp.float32),
           jax.ShapeDtypeStruct((tw,), jnp.uint32))
    return jax.ffi.ffi_call("bsattn_fwd_cuda", out)(
        q, k, v, indptr, indices, jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32),  # (kv_lens, q_offset: none)
        block_r=np.int64(R), block_c=np.int64(C), scale=np.float32(scale),
        softcap=np.float32(softcap), causal=bool(causal))[:2]


_jitted = {}


def run_kernel(q, k, v, indptr, indices, R, C, scale, softcap, causal):
    key = (R, C, float(scale), float(softcap), bool(causal))
    if key not in _jitted:
        _jitted[key] = jax.jit(lambda q, k, v, ip, ix: fwd_call(q, k, v, ip, ix, *key))
    return _jitted[key](q, k, v, indptr, indices)


def reference(q, k, v, cnt, scale, softcap, lowp=None):
    """q [B,M,Hq,D] (float64 values), cnt [LB,LH,M,N]; lowp: numpy dtype whose rounding is applied to the
    scores, P and o (the 'same reference computed in bf16')."""
    rnd = (lambda x: x.astype(lowp).astype(np.float64)) if lowp is not None else (lambda x: x)
    B, M, Hq, D = q.shape
    Hk = k.shape[2]
    g = Hq // Hk
    qh = q.transpose(0, 2, 1, 3)                       # B Hq M D
    kh = np.repeat(k.transpose(0, 2, 1, 3), g, axis=1)  # B Hq N D
    vh = np.repeat(v.transpose(0, 2, 1, 3), g, axis=1)
    c = np.repeat(np.broadcast_to(cnt, (B, Hk) + cnt.shape[2:]), g, axis=1)  # B Hq M N
    x = rnd(scale * (qh @ kh.transpose(0, 1, 3, 2)))
    s = rnd(softcap * np.tanh(x / softcap)) if softcap > 0 else x
    live = c > 0
    mx = np.where(live, s, -np.inf).max(axis=-1, keepdims=True) if s.shape[-1] else np.full(s.shape[:-1] + (1,), -np.inf)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.where(live, c * np.exp(np.where(live, s - mx, 0.0)), 0.0)
    l = e.sum(-1, keepdims=True)
    p = rnd(e / np.where(l > 0, l, 1.0))
    o = rnd(p @ vh)                                    # B Hq M D
    lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)) + mx[..., 0], -np.inf)
    if lowp is not None:
        lse = np.where(np.isfinite(lse), rnd(lse), lse)
    return o.transpose(0, 2, 1, 3), lse.transpose(0, 2, 1)


def check_case(rng, cfg):
    M, N = cfg["M"], cfg["N"]
    R, C, causal, softcap = cfg["R"], cfg["C"], cfg["causal"], cfg["softcap"]
    ndt, jdt, indptr, indices, q, k, v = case_inputs(rng, cfg)
    scale = draw_scale(rng, cfg)
    o, lse = run_kernel(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(indptr), jnp.asarray(indices),
                        R, C, scale, softcap, causal)
    o = np.asarray(o.astype(jnp.float32)).astype(np.float64)
    lse = np.asarray(lse).astype(np.float64)
    cnt = count_matrix(indptr, indices, M, N, R, C, causal)
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    ro, rl = reference(q64, k64, v64, cnt, scale, softcap)
    lo, ll = reference(q64, k64, v64, cnt, scale, softcap, lowp=ndt)
    ro_c = ro.astype(ndt).astype(np.float64)  # o is stored in the input dtype
    empty = ~np.isfinite(rl)
    res = dict(cfg)
    res["scale"] = scale
    res["nan"] = bool(np.isnan(o).any() or np.isnan(lse).any())
    res["empty_rows"] = int(empty.sum())
    res["empty_ok"] = bool(np.array_equal(~np.isfinite(lse), empty) and np.all(lse[empty] == -np.inf)
                           and np.all(o[empty] == 0))
    fin = ~empty
    res["err_o"] = rel(o, ro)
    res["err_o_lowp"] = rel(lo, ro)
    res["err_lse"] = rel(lse[fin], rl[fin]) if fin.any() else 0.0
    res["err_lse_lowp"] = rel(ll[fin], rl[fin]) if fin.any() else 0.0
    res["ok"] = bool(not res["nan"] and res["empty_ok"]
                     and res["err_o"] <= 2 * res["err_o_lowp"] + 1e-4
                     and res["err_lse"] <= 2 * res["err_lse_lowp"] + 1e-4)
    return res


def case_list(quick):
    Rs, Cs, gs, Ds = [1, 3, 16, 64, 128], [1, 5, 16, 64, 128], [1, 4, 8], [64, 128, 256]
    cases = []
    reps = 1 if quick else 3
    i = 0
    for rep in range(reps):
        for R, C in itertools.product(Rs, Cs):
            i += 1
            g = gs[(i + rep) % 3]
            D = Ds[(i // 3 + rep) % 3]
            kind = (i + 2 * rep) % 6
            cases.append(dict(
                R=R, C=C, g=g, D=D, B=1 + (kind == 3), Hk=1 + (i % 2), dtype="f16" if (i + rep) % 4 == 3 else "bf16",
                M=int(max(1, R * (2 + (i * 7 + rep) % 5) - (i % 3) * (R > 1))),
                N=int(max(1, C * (3 + (i * 5 + rep) % 6) + (i % 4) - 1)) if C * 9 < 900 else int(C * 4 + 13),
                causal=bool((i + rep) % 3 == 0), softcap=20.0 if (i + rep) % 5 == 1 else 0.0,
                per_head=kind in (1, 3, 5), per_batch=kind == 3, garbage=kind in (2, 5), dup=kind == 4))
    # edge cases
    cases += [
        dict(R=16, C=16, g=4, D=128, B=1, Hk=2, dtype="bf16", M=200, N=0, causal=False, softcap=0.0,
             per_head=False, per_batch=False, garbage=False, name="N=0"),
        dict(R=16, C=16, g=4, D=128, B=2, Hk=2, dtype="bf16", M=100, N=90, causal=False, softcap=0.0,
             per_head=True, per_batch=True, garbage=False, nnz0=True, name="nnz=0"),
        dict(R=64, C=64, g=4, D=128, B=1, Hk=2, dtype="bf16", M=256, N=512, causal=True, softcap=0.0,
             per_head=False, per_batch=False, garbage=False, name="causal N>M"),
        dict(R=64, C=64, g=1, D=128, B=1, Hk=2, dtype="bf16", M=512, N=200, causal=True, softcap=30.0,
             per_head=True, per_batch=False, garbage=True, name="causal N<M cap"),
        dict(R=128, C=128, g=8, D=64, B=1, Hk=1, dtype="f16", M=300, N=700, causal=False, softcap=0.0,
             per_head=False, per_batch=False, garbage=False, p_empty=0.0, name="dense-ish f16"),
        dict(R=2, C=3, g=3, D=128, B=2, Hk=3, dtype="bf16", M=77, N=91, causal=True, softcap=0.0,
             per_head=True, per_batch=True, garbage=True, dup=True, name="g=3 odd"),
        dict(R=1, C=1, g=8, D=128, B=1, Hk=1, dtype="bf16", M=64, N=900, causal=False, softcap=0.0,
             per_head=False, per_batch=False, garbage=False, p_empty=0.0, name="R=C=1 long rows"),
        dict(R=32, C=1, g=2, D=256, B=1, Hk=2, dtype="bf16", M=100, N=300, causal=False, softcap=0.0,
             per_head=False, per_batch=False, garbage=False, name="R*g=64 D256"),
        dict(R=40, C=8, g=2, D=128, B=1, Hk=1, dtype="bf16", M=120, N=400, causal=False, softcap=0.0,
             per_head=False, per_batch=False, garbage=False, scale=3.0, name="R*g=80 big scale"),
        dict(R=64, C=16, g=5, D=64, B=1, Hk=1, dtype="f16", M=130, N=500, causal=True, softcap=0.0,
             per_head=False, per_batch=False, garbage=False, name="R*g=320 split"),
        # D = 256 on Hopper: the wgmma 64-row tile (32-key tiles), R * g > 16
        dict(R=64, C=3, g=8, D=256, B=2, Hk=2, dtype="bf16", M=150, N=301, causal=True, softcap=0.0,
             per_head=True, per_batch=True, garbage=True, dup=True, name="D256 wgmma: R*g=512 garbage dup"),
        dict(R=16, C=16, g=4, D=256, B=1, Hk=2, dtype="f16", M=90, N=333, causal=False, softcap=20.0,
             per_head=False, per_batch=False, garbage=False, name="D256 wgmma: f16 cap"),
        dict(R=128, C=1, g=1, D=256, B=1, Hk=1, dtype="bf16", M=300, N=100, causal=True, softcap=0.0,
             per_head=False, per_batch=False, garbage=False, p_empty=0.0, name="D256 wgmma: causal N<M"),
    ]
    return cases


def sanitize_cases():
    return [
        dict(R=3, C=5, g=4, D=64, B=2, Hk=2, dtype="bf16", M=40, N=37, causal=True, softcap=10.0,
             per_head=True, per_batch=True, garbage=True, dup=True),
        dict(R=64, C=1, g=2, D=128, B=1, Hk=1, dtype="bf16", M=130, N=75, causal=False, softcap=0.0,
             per_head=False, per_batch=False, garbage=True),
        dict(R=16, C=64, g=1, D=128, B=1, Hk=2, dtype="f16", M=50, N=150, causal=True, softcap=0.0,
             per_head=True, per_batch=False, garbage=True),
        dict(R=1, C=16, g=8, D=256, B=1, Hk=1, dtype="bf16", M=9, N=70, causal=False, softcap=0.0,
             per_head=False, per_batch=False, garbage=True),
        dict(R=128, C=128, g=1, D=256, B=1, Hk=1, dtype="bf16", M=130, N=260, causal=True, softcap=0.0,
             per_head=False, per_batch=False, garbage=True),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    print("seed", a.seed, "devices", jax.devices(), flush=True)
    if a.sanitize:
        for cfg in sanitize_cases():
            Hq = cfg["Hk"] * cfg["g"]
            jdt, ndt = DT[cfg["dtype"]]
            MB, NB = -(-cfg["M"] // cfg["R"]), -(-cfg["N"] // cfg["C"])
            LB = cfg["B"] if cfg["per_batch"] else 1
            LH = cfg["Hk"] if cfg["per_head"] else 1
            ip, ix = make_layout(rng, MB, NB, LB, LH, garbage=True, dup=cfg.get("dup", False))
            q = rng.standard_normal((cfg["B"], cfg["M"], Hq, cfg["D"])).astype(ndt)
            k = rng.standard_normal((cfg["B"], cfg["N"], cfg["Hk"], cfg["D"])).astype(ndt)
            v = rng.standard_normal((cfg["B"], cfg["N"], cfg["Hk"], cfg["D"])).astype(ndt)
            o, lse = run_kernel(q, k, v, ip, ix, cfg["R"], cfg["C"], 0.1, cfg["softcap"], cfg["causal"])
            jax.block_until_ready((o, lse))
            print("sanitize case done", cfg, "nan:", bool(np.isnan(np.asarray(lse)).any()), flush=True)
        return
    results = []
    t0 = time.time()
    for cfg in case_list(a.quick):
        try:
            r = check_case(rng, cfg)
        except Exception as e:  # report and go on
            r = dict(cfg, ok=False, error=repr(e)[:300])
        results.append(r)
        flag = "ok " if r["ok"] else "FAIL"
        print(f'{flag} R={r["R"]:3} C={r["C"]:3} g={r["g"]} D={r["D"]:3} {r["dtype"]:4} B={r["B"]} Hk={r["Hk"]} '
              f'M={r["M"]:4} N={r["N"]:4} causal={int(r["causal"])} cap={r["softcap"]:4.0f} ph={int(r["per_head"])} '
              f'pb={int(r["per_batch"])} garb={int(r["garbage"])} '
              + (f'err_o {r["err_o"]:.2e} (lowp {r["err_o_lowp"]:.2e}) err_lse {r["err_lse"]:.2e} '
                 f'(lowp {r["err_lse_lowp"]:.2e}) empty={r["empty_rows"]} empty_ok={int(r["empty_ok"])} nan={int(r["nan"])}'
                 if "err_o" in r else r.get("error", "")) + (" " + r["name"] if "name" in r else ""), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "check_fwd.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    nfail = sum(not r["ok"] for r in results)
    worst = max((r["err_o"] / (2 * r["err_o_lowp"] + 1e-4) for r in results if "err_o" in r), default=0)
    print(f"CHECK: {len(results) - nfail}/{len(results)} passed in {time.time() - t0:.0f} s; "
          f"worst err_o / budget = {worst:.2f}", flush=True)
    sys.exit(1 if nfail else 0)


if __name__ == "__main__":
    main()
