"""Decode-shaped forward timing on a CUDA GPU: a few query rows against a long KV sequence.

    python benchmarks/bench_decode.py --out results/                 # jax_bsattn (public API)
    python benchmarks/bench_decode.py --out results/ --peer fi       # FlashInfer BlockSparseAttentionWrapper (torch)

Serving picks a few KV blocks per query block out of a long cache (Quest / top-k page selection): M = 1..64 query
rows (one block row: R = M, so the g query heads of a KV head and the M rows share one selection), N = 32K..128K
keys, `--keys` of them selected as N / C blocks chosen at random (the same seed in both modes, so the peer sees the
same layout). Hq = 32, Hk = 8, D = 128, bf16, batch 1 (the peer takes one sequence); `--batch` adds rows for B > 1
(jax_bsattn only).

Such a call reads little and computes less: the roof is memory, Hk x keys x D x 2 (K and V) x 2 bytes, so the
figure is GB/s of K / V read (and the time). Time: jax_bsattn, the median over --reps repetitions of one jitted
function running the forward `calls` times back to back (o feeds the next call's q), host clock around
block_until_ready (so a share of the host's time per repetition stays in each call's figure: fewer chained calls,
more of it), and `gpu_us`, the chain's device time per call (the span of its kernels in a jax.profiler trace); the
peer, CUDA events around a CUDA graph of 50 runs where it captures, else triton's do_bench median.
Each jax_bsattn output is checked against a float32 NumPy reference (rel_err). `--kv-lens` passes per-sequence key
lengths (N - 7: the last block cut; the forward's kernels take the lengths). `--ab-split` times the forward's row
split on and off in one process. Rows go to decode_<label>.jsonl (decode_split_ab.jsonl) or decode_fi.jsonl in --out.
"""
import argparse, json, os, statistics, time

import numpy as np

HQ, HK, D = 32, 8, 128
# (M, N, C, keys selected): one block row of R = M rows
CASES = [(1, 32768, 16, 2048), (1, 32768, 64, 2048), (1, 131072, 16, 4096), (1, 131072, 64, 8192),
         (4, 131072, 64, 8192), (16, 32768, 64, 4096), (64, 131072, 64, 8192)]


def selection(N, C, keys, seed=5):
    """indptr, indices of one block row holding keys / C distinct random block columns, sorted."""
    NB = -(-N // C)
    k = min(NB, max(1, keys // C))
    cols = np.sort(np.random.default_rng(seed).permutation(NB)[:k]).astype(np.int32)
    return np.array([0, k], np.int32), cols


def kv_bytes(nnz, C, batch):
    return batch * HK * nnz * C * D * 2 * 2


def reference_rel_err(q, k, v, cols, C, o, kv_len):
    """||o - ref|| / ||ref|| over batch 0, ref: the float32 NumPy softmax over the selected keys (all M rows see all
    of them: one block row, no causal mask) below kv_len."""
    M, g = q.shape[1], HQ // HK
    sel = (cols[:, None] * C + np.arange(C)[None]).reshape(-1)
    sel = sel[sel < kv_len]
    qf = np.asarray(q[0], np.float32)
    kf = np.repeat(np.asarray(k[0], np.float32)[sel], g, axis=1)
    vf = np.repeat(np.asarray(v[0], np.float32)[sel], g, axis=1)
    s = np.einsum("mhd,nhd->hmn", qf, kf) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("hmn,nhd->mhd", p / p.sum(-1, keepdims=True), vf)
    return float(np.linalg.norm(np.asarray(o[0], np.float32) - ref) / np.linalg.norm(ref))


def device_us_per_call(f, args, calls):
    """The chain's device time per call: the span of its jax_bsattn kernels in a jax.profiler trace of one run, / calls
    (the host clock also holds the executable's start and end, about 0.4 ms a run on the H200: 7-9 us a call at 50
    calls, which the peer's CUDA events do not see). None where the trace has no such kernel."""
    import glob, gzip, tempfile
    import jax
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(f(*args))
        files = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        if not files:
            return None
        ev = json.load(gzip.open(files[0]))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    gpu_pids = {e["pid"] for e in ev
                if e.get("ph") == "M" and e.get("name") == "process_name" and "GPU" in str(e["args"].get("name"))}
    ks = [e for e in ev if e.get("ph") == "X" and e.get("pid") in gpu_pids and "bsattn" in e.get("name", "")]
    if not ks:
        return None
    return (max(float(e["ts"]) + float(e["dur"]) for e in ks) - min(float(e["ts"]) for e in ks)) / calls


def run_jax(cases, batch_sizes, reps, target_ms, fixed_calls, out, label, ab_split, kv_lens):
    """One row per (batch, case) and setting: `label`, or with ab_split the forward's row split on ("split") and off
    ("nosplit": BSATTN_FWD_SPLIT=0, read when a function is traced, so one process times both), each output checked
    against the float32 reference."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax, jax.numpy as jnp
    import jax_bsattn as jb

    rows = []
    settings = [("split", None), ("nosplit", "0")] if ab_split else [(label, os.environ.get("BSATTN_FWD_SPLIT"))]
    for B in batch_sizes:
        for M, N, C, keys in cases:
            ip, ix = selection(N, C, keys)
            rng = np.random.default_rng(0)
            x = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), jnp.bfloat16)
            q, k, v = x(B, M, HQ, D), x(B, N, HK, D), x(B, N, HK, D)
            args = (q, k, v, jnp.asarray(ip), jnp.asarray(ix))
            for name, split_env in settings:
                if split_env is None:
                    os.environ.pop("BSATTN_FWD_SPLIT", None)
                else:
                    os.environ["BSATTN_FWD_SPLIT"] = split_env

                def build(calls):
                    @jax.jit
                    def f(q, k, v, indptr, indices):
                        layout = jb.BlockSparseLayout.from_csr(indptr, indices, block_size=(M, C), seq_lens=(M, N))
                        o = q
                        lens = jnp.full((B,), N - 7, jnp.int32) if kv_lens else None  # (a last block cut)
                        for _ in range(calls):  # chained: o feeds the next call's q (no CSE, strictly in order)
                            o = jb.block_sparse_attention(o, k, v, layout, kv_lens=lens)
                        return o
                    return f

                f1 = build(1)
                err = reference_rel_err(q, k, v, ix, C, jax.block_until_ready(f1(*args)), N - 7 if kv_lens else N)
                est = []  # the fastest of three warm calls (a first launch loads kernels: milliseconds)
                for _ in range(3):
                    t = time.perf_counter(); jax.block_until_ready(f1(*args)); est.append(time.perf_counter() - t)
                calls = fixed_calls or int(min(100, max(20, round(target_ms / 1e3 / max(min(est), 1e-6)))))
                f = build(calls)
                jax.block_until_ready(f(*args))
                ts = []
                for _ in range(reps):
                    t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append((time.perf_counter() - t) / calls)
                us = 1e6 * statistics.median(ts)
                try:
                    gpu_us = device_us_per_call(f, args, calls)
                except Exception:  # noqa: BLE001  (no profiler here: the host clock alone)
                    gpu_us = None
                row = {"mode": name, "B": B, "M": M, "N": N, "C": C, "keys": int(ix.size * C), "us": us, "gpu_us": gpu_us,
                       "kv_gbs": kv_bytes(ix.size, C, B) / us / 1e3, "calls": calls,
                       "spread_us": 1e6 * (max(ts) - min(ts)), "rel_err": err}
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(out, f"decode_{'split_ab' if ab_split else label}.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def run_flashinfer(cases, backends, reps, out):
    import torch, flashinfer
    import triton.testing as tt

    ws = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    rows = []
    for M, N, C, keys in cases:
        ip, ix = selection(N, C, keys)
        for backend in backends:
            w = flashinfer.BlockSparseAttentionWrapper(ws, backend=backend)
            w.plan(torch.from_numpy(ip).cuda(), torch.from_numpy(ix).cuda(), M, N, M, C, HQ, HK, D,
                   q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, o_data_type=torch.bfloat16)
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(M, HQ, D, dtype=torch.bfloat16, device="cuda", generator=g)
            k = torch.randn(N, HK, D, dtype=torch.bfloat16, device="cuda", generator=g)
            v = torch.randn(N, HK, D, dtype=torch.bfloat16, device="cuda", generator=g)
            o = w.run(q, k, v)
            how, us = "graph", None
            try:
                n = 50
                graph = torch.cuda.CUDAGraph()
                s = torch.cuda.Stream()
                with torch.cuda.stream(s):
                    w.run(q, k, v)
                    torch.cuda.synchronize()
                    with torch.cuda.graph(graph, stream=s):
                        for _ in range(n):
                            w.run(q, k, v)
                graph.replay(); torch.cuda.synchronize()
                ts = []
                for _ in range(reps):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(); graph.replay(); b.record(); torch.cuda.synchronize()
                    ts.append(a.elapsed_time(b) * 1e3 / n)
                us = statistics.median(ts)
            except Exception as e:  # noqa: BLE001  (a wrapper that does not capture: time it plainly)
                how = "do_bench (" + type(e).__name__ + ")"
                us = 1e3 * tt.do_bench(lambda: w.run(q, k, v), warmup=25, rep=100, return_mode="median")
            row = {"mode": "flashinfer-" + backend, "B": 1, "M": M, "N": N, "C": C, "keys": int(ix.size * C),
                   "us": us, "kv_gbs": kv_bytes(ix.size, C, 1) / us / 1e3, "timing": how}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del w, q, k, v, o
            torch.cuda.empty_cache()
    with open(os.path.join(out, "decode_fi.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--peer", choices=["fi"], default=None, help="time FlashInfer instead of jax_bsattn")
    p.add_argument("--fi-backends", default="fa2", help="FlashInfer backends to time (fa2, fa3)")
    p.add_argument("--batch", default="1,16", help="batch sizes (jax_bsattn only)")
    p.add_argument("--label", default="jax_bsattn", help="the rows' mode and the file name (an A / B setting)")
    p.add_argument("--ab-split", action="store_true",
                   help="time the forward's row split on and off (BSATTN_FWD_SPLIT=0) in one process")
    p.add_argument("--calls", type=int, default=0, help="chained calls per repetition (default: about --target-ms)")
    p.add_argument("--kv-lens", action="store_true",
                   help="pass kv_lens = N - 7 (the cache's last block partly written; the kernels take the lengths)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--target-ms", type=float, default=30.0)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.peer == "fi":
        run_flashinfer(CASES, a.fi_backends.split(","), a.reps, a.out)
    else:
        run_jax(CASES, [int(b) for b in a.batch.split(",")], a.reps, a.target_ms, a.calls, a.out, a.label,
                a.ab_split, a.kv_lens)


if __name__ == "__main__":
    main()
