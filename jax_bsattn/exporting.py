"""``jax_bsattn.export``: ``jax.export`` for functions that call :func:`block_sparse_attention`, giving serialisable
artifacts (serving, another process, another machine).

The op lowers to the FFI custom calls of csrc/ (``TARGETS``), which jax's export refuses unless told that their
compatibility is the caller's business. :func:`export` says so for these targets, lets a machine without the
target GPU lower for it (``gpu=``), and turns jax's error on what it cannot serialise, the op sharded by ``jit`` over
several devices (its ``custom_partitioning`` holds a Python callback), into one that says what to do instead: call
the op inside ``jax.shard_map``, which exports.

An artifact runs where the same jax_bsattn is installed and imported (``import jax_bsattn`` registers the targets),
because it holds the custom calls' operands and attributes as this version defines them (csrc/README.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
from jax import export as jax_export

from . import lowering

# Every FFI target the op lowers to, on either platform (registered by jax_bsattn._extension).
TARGETS = ("bsattn_fwd_cpu", "bsattn_bwd_cpu", "bsattn_fwd_cuda", "bsattn_bwd_cuda")

# gpu= values: the CUDA lowering's target (lowering.gpu_target): None, whatever GPUs this process sees.
_GPU_TARGETS = {"local": None, "sm90": "sm90", "portable": "portable"}


def disabled_checks() -> list[jax_export.DisabledSafetyCheck]:
    """The ``disabled_checks`` that let ``jax.export.export`` serialise jax_bsattn's custom calls (what
    :func:`export` adds by itself)."""
    return [jax_export.DisabledSafetyCheck.custom_call(t) for t in TARGETS]


_target_checks = disabled_checks   # (export's argument of that name hides the function)


def export(fun: Callable, *, gpu: str = "local", disabled_checks: Sequence = (), **kwargs):
    """``jax.export.export`` for a ``jax.jit`` function that calls the op; returns, as jax's does, a function of
    the arguments (arrays or ``jax.ShapeDtypeStruct``s, symbolic dims allowed) that returns a ``jax.export.Exported``.

    Args:
      fun: a ``jax.jit``-wrapped function.
      gpu: what the CUDA lowering (``platforms`` naming ``"cuda"``) sizes its workspaces and picks its kernels for.
        ``"local"``: the GPUs this process sees (without an H100 / H200, or without a GPU, as ``"portable"``).
        ``"sm90"``: H100 / H200 with the Hopper kernels (the decode split, the atomic-dq and row-oriented backward);
        such an artifact runs on H100 / H200 only. ``"portable"``: any sm_80+ GPU, an H100 too (there without the
        paths that need the Hopper workspaces: deterministic backward, no forward split; correct, slower).
        Another value than ``"local"`` clears jax's caches before and after (``jax.clear_caches``), so that no
        lowering for one target is reused for another.
      disabled_checks: further checks to disable (jax_bsattn's targets are added).
      **kwargs: passed to ``jax.export.export`` (``platforms``, ...).

    Raises:
      ValueError: ``gpu`` is not one of the above; or the exported function shards the op over several devices
        through ``jit`` (jax cannot serialise ``custom_partitioning``): call the op inside ``jax.shard_map``.
    """
    if gpu not in _GPU_TARGETS:
        raise ValueError(f"jax_bsattn.export: gpu must be one of {sorted(_GPU_TARGETS)}; got {gpu!r}")
    target = _GPU_TARGETS[gpu]
    exporter = jax_export.export(fun, disabled_checks=[*disabled_checks, *_target_checks()], **kwargs)

    def lower_and_export(*args, **kw) -> jax_export.Exported:
        try:
            exported = _lowered_for(target, lambda: exporter(*args, **kw))
        except NotImplementedError as e:
            if "host_callbacks" not in str(e):
                raise
            # jit on a mesh lowers the op to custom_partitioning, whose Python callback jax cannot serialise
            raise ValueError(
                "jax_bsattn.export: jax.export cannot serialise host callbacks, and block_sparse_attention sharded "
                "over several devices by jit is one (custom_partitioning); call the op inside jax.shard_map (each "
                f"device's shard in its body) to export a sharded program (jax: {e})") from e
        return _vjp_lowered_for(target, exported)

    return lower_and_export


def _lowered_for(target: str | None, lower: Callable):
    """lower() with the CUDA lowerings targeting ``target`` (None: the local GPUs)."""
    if target is None:
        return lower()
    jax.clear_caches()               # a lowering for the local GPUs, cached, would be reused
    lowering.gpu_target = target
    try:
        return lower()
    finally:
        lowering.gpu_target = None
        jax.clear_caches()           # later jit calls lower for the local GPUs again


def _vjp_lowered_for(target: str | None, exported: jax_export.Exported) -> jax_export.Exported:
    # jax exports an artifact's VJP when asked (Exported.vjp, serialize(vjp_order=...)), after export returned: lower it
    # for the same GPU. (_get_vjp is the dataclass field jax 0.10-0.12 keep the VJP's exporter in.)
    get_vjp = getattr(exported, "_get_vjp", None)
    if target is None or get_vjp is None:
        return exported
    return dataclasses.replace(
        exported, _get_vjp=lambda primal: _vjp_lowered_for(target, _lowered_for(target, lambda: get_vjp(primal))))
