"""The README's quickstart block and examples/quickstart.py run as a user would: on the CPU path here, and on the GPU
(where the CUDA kernels take bf16 / f16 only) with the gpu marker."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_block(section):
    """The first python block of the README's section (its heading)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text[text.index(section):]
    block = block[block.index("```python") + len("```python"):]
    return block[:block.index("```")]


def _readme_quickstart():
    return _readme_block("## Quickstart")


def _run_readme_quickstart():
    ns = {}
    exec(compile(_readme_quickstart(), "README.md quickstart", "exec"), ns)
    o, q = ns["o"], ns["q"]
    assert o.shape == q.shape and o.dtype == q.dtype
    assert bool(jnp.isfinite(o.astype(jnp.float32)).all()) and float(jnp.abs(o.astype(jnp.float32)).max()) > 0
    return o


def test_readme_quickstart_block():
    o = _run_readme_quickstart()
    assert o.devices() == {jax.devices("cpu")[0]}


def test_readme_decode_block():
    """The README's decode step runs and, with its block_sparse_attention swapped for the reference (float32 and bf16
    arithmetic), meets the project's criterion: the routing, per-(batch, KV head) layouts and all."""
    import functools

    import jax_bsattn as jb
    from conftest import assert_close
    from jax_bsattn.reference import reference_in_dtype

    code = _readme_block("## Decode steps")
    assert code.count("jb.block_sparse_attention(") == 1
    code = code.replace("jb.block_sparse_attention(", "_attention(")
    outs = {}
    for name, fn in (("op", jb.block_sparse_attention), ("ref32", reference_in_dtype),
                     ("ref_lp", functools.partial(reference_in_dtype, compute_dtype=jnp.bfloat16))):
        ns = {"_attention": fn}
        exec(compile(code, "README.md decode step", "exec"), ns)
        # (lengths that cut a block: 2600 = 40 x 64 + 40, 1000 = 15 x 64 + 40)
        assert ns["lens"].tolist() == [2600, 1000]
        outs[name] = ns["o"]
    assert outs["op"].shape == ns["q"].shape
    assert_close("o", outs["op"], outs["ref32"], outs["ref_lp"])


def test_readme_export_block():
    """The README's export block, run after its decode block as a reader would: the decode step exported for H100 /
    H200 from this machine (no GPU needed), serialised, and the blob read back."""
    ns = {}
    exec(compile(_readme_block("## Decode steps"), "README.md decode step", "exec"), ns)
    exec(compile(_readme_block("## Exporting"), "README.md export", "exec"), ns)
    assert isinstance(ns["blob"], (bytes, bytearray)) and len(ns["blob"]) > 0
    restored = jax.export.deserialize(ns["blob"])
    assert restored.platforms == ("cuda",) and restored.out_avals[0].shape == ns["q"].shape


@pytest.mark.gpu
def test_readme_quickstart_block_and_quickstart_script_on_gpu():
    with jax.default_device(jax.devices("cuda")[0]):
        o = _run_readme_quickstart()
    assert next(iter(o.devices())).platform == "gpu"
    # the script in its own process, on the default backend (the GPU); cwd: tests/, so that it imports jax_bsattn
    # as this process did
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py")], capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "backend: gpu" in proc.stdout and "bfloat16" in proc.stdout, proc.stdout


def test_package_imports_without_flax():
    """`import jax_bsattn` and `from jax_bsattn import *` work where flax is missing (it is an extra); only
    `jax_bsattn.flax` needs it. In a fresh process with flax blocked."""
    code = ("import sys; sys.modules['flax'] = None\n"
            "import jax_bsattn\n"
            "from jax_bsattn import *\n"
            "assert callable(block_sparse_attention) and 'flax' not in dir()\n"
            "try:\n    jax_bsattn.flax\nexcept ImportError:\n    print('flax: ImportError')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "flax: ImportError"
