"""Forward timing grid of jax_bsattn on a CUDA GPU: the peers' grid (benchmarks/README.md).

    python benchmarks/bench_grid.py --out results/ [--peers-jsonl anchors.jsonl] [--backend auto|api|ffi]

Work (the same as /shared/peers/bench_peers.py, so the numbers compare cell by cell): one sequence,
M = N = --seq (8192), Hq = 32, D = --head-dim (128), bf16, g = Hq / Hk in {1, 4, 8}, a random BSR layout of R x C
blocks with the same number of blocks in every block row (density 0.25; bench_peers.random_bsr, seed 2),
R, C in {1, 16, 64, 128}. Plus block-causal layouts (block row i lists blocks 0..i) next to a uniform
random layout with the same number of blocks per layout: their ratio shows the work balance.

Useful TFLOP/s = 4 * nnz * R * C * D * Hq / time (only the work inside listed blocks counts). Time: the
median over --reps repetitions of a jitted function running the forward --calls times back to back
(calls chosen so that one repetition takes about --target-ms), host clock around block_until_ready.

Backends: `api` = jax_bsattn.block_sparse_attention with BlockSparseLayout.from_csr; `ffi` = the
registered FFI target bsattn_fwd_cuda called directly (needs _bsattn_cuda importable, e.g. PYTHONPATH set
to the CMake build's csrc/cuda); `auto` = api when jax_bsattn imports, else ffi.
Writes grid.json (one row per cell) and grid.png to --out; with --peers-jsonl (rows of bench_peers.py)
it joins FlashInfer fa2 / fa3 and FlexAttention figures of the same cells and prints the ratios.
"""
import argparse, json, math, os, statistics, time

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax
import jax.numpy as jnp

D, HQ = 128, 32
HK_OF = {g: HQ // g for g in (1, 2, 4, 8, 16, 32)}  # any g that divides Hq
BLOCKS = [1, 16, 64, 128]
CAUSAL_CELLS = [(1, 128, 128), (4, 128, 128), (8, 128, 128), (4, 64, 64), (8, 64, 64), (4, 16, 16), (1, 16, 16)]


def random_bsr(MB, NB, density, seed=2):
    """bench_peers.random_bsr: each block row gets exactly round(density * NB) distinct columns."""
    rng = np.random.default_rng(seed)
    k = max(1, int(round(density * NB)))
    cols = np.argsort(rng.random((MB, NB)), axis=1)[:, :k]
    cols.sort(axis=1)
    indptr = np.arange(0, (MB + 1) * k, k, dtype=np.int32)
    return indptr, cols.reshape(-1).astype(np.int32)


def uniform_k(MB, NB, k, seed=3):
    rng = np.random.default_rng(seed)
    cols = np.argsort(rng.random((MB, NB)), axis=1)[:, :k]
    cols.sort(axis=1)
    return np.arange(0, (MB + 1) * k, k, dtype=np.int32), cols.reshape(-1).astype(np.int32)


def block_causal(MB, NB):
    counts = np.minimum(np.arange(1, MB + 1), NB)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = np.concatenate([np.arange(c) for c in counts]).astype(np.int32)
    return indptr, indices


# ---- backends -----------------------------------------------------------------------------------
def make_backend(name, fwdbwd=False):
    if fwdbwd and name != "api":
        raise SystemExit("--fwdbwd times jax.grad through the public API: use --backend api")
    if name in ("auto", "api"):
        try:
            import jax_bsattn
            if jax_bsattn.__dict__.get("block_sparse_attention") is None:
                raise ImportError("no block_sparse_attention")

            def build(R, C, M, N, calls):
                @jax.jit
                def f(q, k, v, indptr, indices):
                    layout = jax_bsattn.BlockSparseLayout.from_csr(indptr, indices, block_size=(R, C),
                                                                   seq_lens=(M, N))

                    def loss(q, k, v):
                        return jnp.sum(jax_bsattn.block_sparse_attention(q, k, v, layout).astype(jnp.float32))

                    o = q
                    for _ in range(calls):  # chained: o feeds the next call's q (no CSE, strictly in order)
                        if fwdbwd:   # one forward + one backward (dq, dk, dv)
                            dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(o, k, v)
                            o = (dq + dk[:, :1].mean() + dv[:, :1].mean()).astype(q.dtype)
                        else:
                            o = jax_bsattn.block_sparse_attention(o, k, v, layout)
                    return o
                return f
            return "api", build
        except Exception as e:  # noqa: BLE001
            if name == "api":
                raise
            print("jax_bsattn not usable (", repr(e)[:120], "): calling the FFI target directly", flush=True)
    try:
        import _bsattn_cuda
    except ImportError:
        from jax_bsattn import _bsattn_cuda
    for n, c in _bsattn_cuda.registrations().items():
        jax.ffi.register_ffi_target(n, c, platform="CUDA")

    def build(R, C, M, N, calls):
        scale = np.float32(1.0 / math.sqrt(D))

        @jax.jit
        def f(q, k, v, indptr, indices):
            ip = indptr.reshape(1, 1, -1)
            ix = indices.reshape(1, 1, -1)
            # the workspace: the sweep's bit maps as csrc/cuda/fwd/params.h fwd_sweep_table_words sizes them where
            # R * g <= 16 with at least 16 block rows (used only where the sweep runs); else none (the handler takes an
            # empty one: no row split here, which only the lowering sizes)
            MB, words = -(-M // R), -(-N // 32)
            g = q.shape[2] // k.shape[2]
            tw = MB * (words + 1) if R * g <= 16 and MB >= 16 and MB * words <= ix.shape[-1] else 0
            out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32),
                   jax.ShapeDtypeStruct((tw,), jnp.uint32))
            call = jax.ffi.ffi_call("bsattn_fwd_cuda", out, has_side_effect=True)
            res, none = None, jnp.zeros((0,), jnp.int32)  # (kv_lens, q_offset: none)
            for _ in range(calls):
                res = call(q, k, v, ip, ix, none, none, block_r=np.int64(R), block_c=np.int64(C), scale=scale,
                           softcap=np.float32(0), causal=False)
            return res[0]
        return f
    return "ffi", build


def time_cell(build, R, C, M, N, indptr, indices, q, k, v, reps, target_ms):
    ip, ix = jnp.asarray(indptr), jnp.asarray(indices)
    f1 = build(R, C, M, N, 1)
    jax.block_until_ready(f1(q, k, v, ip, ix))
    t = time.perf_counter()
    jax.block_until_ready(f1(q, k, v, ip, ix))
    est = time.perf_counter() - t
    calls = int(min(50, max(2, round(target_ms / 1e3 / max(est, 1e-6)))))
    f = build(R, C, M, N, calls)
    jax.block_until_ready(f(q, k, v, ip, ix))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(q, k, v, ip, ix))
        ts.append((time.perf_counter() - t) / calls)
    return 1e3 * statistics.median(ts), calls, 1e3 * (max(ts) - min(ts))


def load_peers(path, seq, density, fwdbwd=False):
    """Peers' useful TFLOP/s per (system, g, R, C): forward figures, or forward + backward ones (FlexAttention
    only: FlashInfer has no backward)."""
    peers = {}
    key = "fwdbwd_tflops" if fwdbwd else "fwd_tflops"
    if not path or not os.path.exists(path):
        return peers
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("seq", 8192) != seq or r.get("density", 0.25) != density:
            continue
        if r.get("kind") == "fi" and not fwdbwd:
            peers[(r["req"], r["g"], r["R"], r["C"])] = r["fwd_tflops"]
        elif r.get("kind") == "flex" and key in r:
            peers[("flex", r["g"], r["R"], r["C"])] = r[key]
    return peers


def plot(rows, peers, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
        return
    grid = [r for r in rows if r["layout"] == "random"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), sharey=True)
    for ax, g in zip(axes, (1, 4, 8)):
        cells = [r for r in grid if r["g"] == g]
        labels = [f'{r["R"]}x{r["C"]}' for r in cells]
        x = np.arange(len(cells))
        ax.bar(x - 0.2, [r["tflops"] for r in cells], 0.4, label="jax_bsattn")
        fa2 = [peers.get(("fa2", g, r["R"], r["C"]), 0) for r in cells]
        if any(fa2):
            ax.bar(x + 0.2, fa2, 0.4, label="FlashInfer fa2")
        ax.set_xticks(x, labels, rotation=60)
        ax.set_title(f"g = {g} (Hq = {HQ}, Hk = {HK_OF[g]})")
        ax.set_xlabel("R x C")
    axes[0].set_ylabel("useful TFLOP/s (forward)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for grid.json and grid.png")
    ap.add_argument("--peers-jsonl", default=None, help="anchors.jsonl written by bench_peers.py")
    ap.add_argument("--backend", default="auto", choices=["auto", "api", "ffi"])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--cells", default="", help="restrict to g:R:C,g:R:C,...")
    ap.add_argument("--no-causal", action="store_true", help="skip the block-causal cells")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--target-ms", type=float, default=60.0)
    ap.add_argument("--fwdbwd", action="store_true",
                    help="time forward + backward (jax.grad); useful FLOPs x 3.5 (api backend only)")
    ap.add_argument("--head-dim", type=int, default=128, help="the head dim D (64, 128 or 256)")
    a = ap.parse_args()
    global D
    D = a.head_dim
    os.makedirs(a.out, exist_ok=True)
    backend, build = make_backend(a.backend, a.fwdbwd)
    flop_mult = 3.5 if a.fwdbwd else 1.0
    print("backend", backend, "device", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    M = N = a.seq
    cells = ([tuple(int(x) for x in c.split(":")) for c in a.cells.split(",") if c]
             or [(g, R, C) for g in (1, 4, 8) for R in BLOCKS for C in BLOCKS])
    for g, R, C in cells:
        if g not in HK_OF or min(R, C) < 1:
            ap.error(f"--cells: {g}:{R}:{C} needs g dividing Hq = {HQ} and R, C >= 1")
    key = jax.random.PRNGKey(0)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (1, M, HQ, D), jnp.bfloat16)
    kvs = {}  # by g, made on first use (the same keys as before for every g)
    layouts = {}
    rows = []
    out_json = os.path.join(a.out, "grid.json")

    def record(g, R, C, layout, indptr, indices):
        if g not in kvs:
            kvs[g] = (jax.random.normal(kk, (1, N, HK_OF[g], D), jnp.bfloat16),
                      jax.random.normal(kv, (1, N, HK_OF[g], D), jnp.bfloat16))
        k, v = kvs[g]
        nnz = int(indptr[-1])
        ms, calls, spread = time_cell(build, R, C, M, N, indptr, indices, q, k, v, a.reps, a.target_ms)
        tf = flop_mult * 4.0 * nnz * R * C * D * HQ / ms / 1e9
        r = dict(g=g, R=R, C=C, D=D, layout=layout, seq=M, density=a.density, nnz=nnz, ms=ms, tflops=tf, calls=calls,
                 spread_ms=spread, backend=backend, fwdbwd=a.fwdbwd)
        rows.append(r)
        print(json.dumps(r), flush=True)
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)
        return r

    for g, R, C in cells:
        MB, NB = -(-M // R), -(-N // C)
        if (R, C) not in layouts:
            layouts[(R, C)] = random_bsr(MB, NB, a.density)
        record(g, R, C, "random", *layouts[(R, C)])
    if not a.no_causal:
        for g, R, C in CAUSAL_CELLS:
            MB, NB = -(-M // R), -(-N // C)
            ip, ix = block_causal(MB, NB)
            rc = record(g, R, C, "block_causal", ip, ix)
            ku = max(1, int(round(ix.size / MB)))
            ru = record(g, R, C, "uniform_same_nnz", *uniform_k(MB, NB, ku))
            rc["ratio_vs_uniform"] = rc["tflops"] / ru["tflops"]
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)

    peers = load_peers(a.peers_jsonl, M, a.density, a.fwdbwd)
    print(f"\nuseful TFLOP/s, {'forward + backward' if a.fwdbwd else 'forward'}, M = N = {M}, Hq = {HQ}, D = {D}, bf16, density {a.density} ({backend})")
    print(f'{"g":>2} {"R":>4} {"C":>4} {"ms":>9} {"TF/s":>7} {"fa2":>6} {"x fa2":>6} {"fa3":>6} {"x fa3":>6} {"flex":>6} {"x flex":>6}')
    for r in rows:
        if r["layout"] != "random":
            continue
        fa2 = peers.get(("fa2", r["g"], r["R"], r["C"]))
        fa3 = peers.get(("fa3", r["g"], r["R"], r["C"]))
        flex = peers.get(("flex", r["g"], r["R"], r["C"]))
        r["fa2_tflops"], r["fa3_tflops"], r["flex_tflops"] = fa2, fa3, flex
        f = lambda x: f"{x:6.1f}" if x else "     -"
        ratio = lambda x: f"{r['tflops'] / x:6.2f}" if x else "     -"
        print(f'{r["g"]:>2} {r["R"]:>4} {r["C"]:>4} {r["ms"]:9.3f} {r["tflops"]:7.1f} {f(fa2)} {ratio(fa2)} {f(fa3)} '
              f'{ratio(fa3)} {f(flex)} {ratio(flex)}')
    causal = [r for r in rows if r["layout"] == "block_causal"]
    if causal:
        print("\nblock-causal (row i lists blocks 0..i) vs a uniform random layout with the same nnz")
        for r in causal:
            print(f'g={r["g"]} R={r["R"]:3} C={r["C"]:3}  causal {r["tflops"]:6.1f} TF/s  '
                  f'ratio vs uniform {r.get("ratio_vs_uniform", float("nan")):.2f}')
    with open(out_json, "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, peers, os.path.join(a.out, "grid.png"))


if __name__ == "__main__":
    main()
