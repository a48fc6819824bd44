"""Pieces shared by the device checks of the CUDA kernels (csrc/cuda/dev/check_fwd.py, csrc/cuda/bwd/check_bwd.py):
dtype table, random BSR layouts (valid or garbage), the element multiplicities the contract (csrc/README.md)
reads from a layout, one case's random inputs, and the relative error. NumPy only (plus the jnp dtypes)."""
import math

import numpy as np
import jax.numpy as jnp
import ml_dtypes

DT = {"bf16": (jnp.bfloat16, ml_dtypes.bfloat16), "f16": (jnp.float16, np.float16)}


def make_layout(rng, MB, NB, LB, LH, garbage=False, dup=False, p_empty=0.15, maxk=None):
    """indptr [LB, LH, MB+1], indices [LB, LH, nnz] (int32) with random rows; garbage: invalid indices inside rows,
    corrupted indptr entries, valid-looking padding past indptr[MB]; dup: that many extra copies of one block in
    some rows (True = one)."""
    rows_all, nnz = [], 0
    for _ in range(LB * LH):
        rows = []
        for r in range(MB):
            if rng.random() < p_empty or NB == 0:
                cols = []
            else:
                kmax = min(NB, maxk or NB)
                kk = int(rng.integers(1, kmax + 1))
                cols = sorted(rng.choice(NB, kk, replace=False).tolist())
            if garbage and rng.random() < 0.4:
                bad = [-1, NB, NB + 7, 2 ** 31 - 1, -2 ** 31, -(NB + 3)]
                for _ in range(int(rng.integers(1, 4))):
                    cols.insert(int(rng.integers(0, len(cols) + 1)), int(rng.choice(bad)))
            if dup and cols and rng.random() < 0.3:
                cols += [cols[int(rng.integers(0, len(cols)))]] * int(dup)
            rows.append(cols)
        rows_all.append(rows)
        nnz = max(nnz, sum(len(c) for c in rows))
    nnz += int(rng.integers(0, 6)) if garbage else int(rng.integers(0, 2))
    indptr = np.zeros((LB * LH, MB + 1), np.int64)
    indices = np.zeros((LB * LH, nnz), np.int64)
    for li, rows in enumerate(rows_all):
        flat = [c for cols in rows for c in cols]
        indptr[li, 1:] = np.cumsum([len(c) for c in rows])
        indices[li, :len(flat)] = flat
        indices[li, len(flat):] = rng.integers(0, max(NB, 1), nnz - len(flat))  # padding: must never be read
        if garbage:
            for _ in range(int(rng.integers(1, 4))):
                r = int(rng.integers(0, MB + 1))
                indptr[li, r] = int(rng.choice([-5, -2 ** 31, nnz + 3, 2 ** 31 - 1, indptr[li, r] // 2]))
    return (indptr.reshape(LB, LH, MB + 1).astype(np.int32), indices.reshape(LB, LH, nnz).astype(np.int32))


def count_matrix(indptr, indices, M, N, R, C, causal, dtype=np.float64):
    """[LB, LH, M, N] multiplicity of each element, read exactly as the contract says."""
    LB, LH, MB1 = indptr.shape
    MB, nnz, NB = MB1 - 1, indices.shape[2], -(-N // C)
    cnt = np.zeros((LB, LH, M, N), dtype)
    for lb in range(LB):
        for lh in range(LH):
            ip = indptr[lb, lh].astype(np.int64)
            for r in range(MB):
                s = min(max(ip[r], 0), nnz)
                e = min(max(ip[r + 1], s), nnz)
                for c in indices[lb, lh, s:e]:
                    if 0 <= c < NB:
                        cnt[lb, lh, r * R:(r + 1) * R, c * C:min((c + 1) * C, N)] += 1
    if causal:
        i = np.arange(M)[:, None]
        j = np.arange(N)[None, :]
        cnt[:, :, (j > i + (N - M))] = 0
    return cnt


def case_inputs(rng, cfg):
    """One case's layout and q, k, v (in this order from rng): (ndt, jdt, indptr, indices, q, k, v) with ndt / jdt
    the NumPy / jnp dtype of cfg["dtype"]."""
    B, M, N, Hk, g, D = cfg["B"], cfg["M"], cfg["N"], cfg["Hk"], cfg["g"], cfg["D"]
    jdt, ndt = DT[cfg["dtype"]]
    MB, NB = -(-M // cfg["R"]), -(-N // cfg["C"])
    LB = B if cfg["per_batch"] else 1
    LH = Hk if cfg["per_head"] else 1
    indptr, indices = make_layout(rng, MB, NB, LB, LH, garbage=cfg["garbage"], dup=cfg.get("dup", False),
                                  p_empty=cfg.get("p_empty", 0.15), maxk=cfg.get("maxk"))
    if cfg.get("nnz0"):
        indptr = np.zeros_like(indptr)
        indices = np.zeros((LB, LH, 0), np.int32)
    q = rng.standard_normal((B, M, Hk * g, D)).astype(ndt)
    k = rng.standard_normal((B, N, Hk, D)).astype(ndt)
    v = rng.standard_normal((B, N, Hk, D)).astype(ndt)
    return ndt, jdt, indptr, indices, q, k, v


def draw_scale(rng, cfg):
    return float(cfg.get("scale", 1.0 / math.sqrt(cfg["D"]) * rng.uniform(0.5, 2.0)))


def rel(a, b):
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))
