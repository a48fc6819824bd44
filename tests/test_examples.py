"""The README's quickstart block and examples/quickstart.py run as a user would: on the CPU path here, and on the GPU
(where the CUDA kernels take bf16 / f16 only) with the gpu marker."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_quickstart():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text[text.index("## Quickstart"):]
    block = block[block.index("```python") + len("```python"):]
    return block[:block.index("```")]


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
