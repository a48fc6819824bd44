"""List-scheduling model of the column kernels' CTA order (bwd/common.cuh column_tile), no GPU needed.

Each CTA (one 128-key tile of one block column of one (batch, KV head): the two-warpgroup Hopper tiles, C >= 128)
costs its number of 64-row query tiles plus a fixed overhead; the hardware hands CTAs to the first free SM in grid
order (greedy list scheduling, 1 CTA per SM).
Prints the makespan over the ideal (total work / SMs) for head-major order (each head's columns longest first) and
for the chunked order the launcher uses (column_head_chunks: balanced chunks of heads, at least one wave each, each
slot-major), on the peers' grid layouts (benchmarks/bench_grid.py random_bsr, M = N = 8192, Hq = 32, density 0.25).

    python3 csrc/cuda/dev/schedule_sim.py [--sms 132] [--overhead 2]

A model, not a measurement: it ignores L2 effects (why the order is chunked rather than slot-major over all heads)
and the differences between tiles.
"""

from __future__ import annotations

import argparse
import heapq
import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "benchmarks"))
from bench_grid import HK_OF, random_bsr  # noqa: E402


def greedy_makespan(costs, sms):
    free = [0.0] * sms
    heapq.heapify(free)
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def head_chunks(heads, per_head, sms):
    """column_head_chunks (common/launch.cuh), one CTA per SM: chunk sizes."""
    min_heads = max(1, math.ceil(sms / per_head))
    n = max(1, heads // min_heads)
    return [heads // n + (1 if i < heads % n else 0) for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--overhead", type=float, default=2.0, help="per-CTA cost beyond its tiles, in tiles")
    ap.add_argument("--seq", type=int, default=8192)
    a = ap.parse_args()
    print(f"makespan / ideal, {a.sms} SMs, overhead {a.overhead} tiles per CTA")
    print(" g    R    C  CTAs  head-major  chunked (chunk sizes)")
    for g, R, C in [(4, 128, 128), (1, 128, 128), (8, 128, 128), (4, 64, 128), (4, 16, 128), (4, 1, 128),
                    (1, 128, 256), (8, 128, 256)]:
        MB, NB = a.seq // R, a.seq // C
        _, indices = random_bsr(MB, NB, 0.25)
        lens = np.bincount(indices, minlength=NB)
        nkc = max(1, -(-C // 128))
        order = np.argsort(-lens, kind="stable")                    # col_order: longest first
        per_col = np.repeat(np.ceil(lens[order] * R * g / 64) + a.overhead, nkc)   # key tiles of a column together
        heads = HK_OF[g]
        head_major = np.tile(per_col, heads)
        chunks = head_chunks(heads, NB * nkc, a.sms)
        chunked = np.concatenate([np.concatenate([np.tile(per_col[i * nkc:(i + 1) * nkc], h) for i in range(NB)])
                                  for h in chunks])
        ideal = head_major.sum() / a.sms
        print(f"{g:2d} {R:4d} {C:4d} {len(head_major):5d}  {greedy_makespan(head_major, a.sms) / ideal:10.3f}  "
              f"{greedy_makespan(chunked, a.sms) / ideal:7.3f} {chunks}")


if __name__ == "__main__":
    main()
