"""Property test: random small problems and layouts (seeded, bounded) against the reference."""

import numpy as np
from hypothesis import given, settings, strategies as st

import jax_bsattn as jb
from conftest import check_forward, check_gradients, random_problem


@st.composite
def problems(draw):
    R, C = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    M, N = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    Hk, g = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([1, 3, 8, 16]))
    per_head = draw(st.booleans())
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(R=R, C=C, M=M, N=N, Hk=Hk, g=g, D=D, per_head=per_head, density=density, seed=seed,
                causal=draw(st.booleans()), softcap=draw(st.sampled_from([None, 4.0])))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(problems())
def test_random_layouts(p):
    rng = np.random.default_rng(p["seed"])
    MB, NB = -(-p["M"] // p["R"]), -(-p["N"] // p["C"])
    lead = (p["Hk"],) if p["per_head"] else ()
    mask = rng.random(lead + (MB, NB)) < p["density"]
    layout = jb.BlockSparseLayout.from_block_mask(mask, (p["R"], p["C"]), (p["M"], p["N"]))
    q, k, v = random_problem(rng, M=p["M"], N=p["N"], Hq=p["g"] * p["Hk"], Hk=p["Hk"], D=p["D"])
    check_forward(q, k, v, layout, causal=p["causal"], logits_soft_cap=p["softcap"])
    if p["seed"] % 3 == 0:
        check_gradients(q, k, v, layout, causal=p["causal"], logits_soft_cap=p["softcap"])


@settings(max_examples=15, deadline=None, derandomize=True)
@given(problems(), st.data())
def test_random_lengths_and_offsets(p, data):
    """Two sequences with per-sequence key lengths (clipped: drawn past both ends) and, when causal, offsets: forward
    and gradients (every kernel takes both, forward and backward) against the reference."""
    rng = np.random.default_rng(p["seed"])
    M, N = p["M"], p["N"]
    MB, NB = -(-M // p["R"]), -(-N // p["C"])
    mask = rng.random((2, p["Hk"]) + (MB, NB)) < max(p["density"], 0.3)
    layout = jb.BlockSparseLayout.from_block_mask(mask, (p["R"], p["C"]), (M, N))
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=p["g"] * p["Hk"], Hk=p["Hk"], D=p["D"])
    lens = np.array(data.draw(st.lists(st.integers(-2, N + 2), min_size=2, max_size=2)), np.int32)
    kw = dict(causal=p["causal"], logits_soft_cap=p["softcap"], kv_lens=lens)
    if p["causal"]:
        kw["q_offset"] = np.array(data.draw(st.lists(st.integers(-M - 2, N + 2), min_size=2, max_size=2)), np.int32)
    check_forward(q, k, v, layout, **kw)
    check_gradients(q, k, v, layout, **kw)
