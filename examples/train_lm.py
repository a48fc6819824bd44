"""A small decoder-only byte-level language model (Flax NNX) with block-sparse attention, trained with optax.

The text is the Python standard library's own source (the ``*.py`` files next to ``os.py``), so nothing is
downloaded. Attention is block-causal + a local window + the first block as a global "sink"
(``jax_bsattn.layouts``); ``--dense`` runs the same model with ``jax.nn.dot_product_attention`` and the
equivalent dense mask, for comparison.

    python examples/train_lm.py                                  # CPU defaults: well under two minutes
    python examples/train_lm.py --seq-len 2048 --dim 512 --heads 8 --kv-heads 2 --layers 6 --dtype bf16

On a GPU the defaults grow and the dtype is bf16 (the CUDA kernels take bf16 / f16, head dims 64/128/256).
Writes ``loss.png``, ``layout.png`` and ``metrics.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_bsattn import layouts
from jax_bsattn.flax import BlockSparseMultiHeadAttention
from jax_bsattn.zigzag import to_zigzag

try:
    from tqdm.auto import tqdm
except ImportError:  # optional: plain progress lines instead
    tqdm = None

_List = getattr(nnx, "List", list)   # flax >= 0.12 wants nnx.List for a list of submodules

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
CPU_DEFAULTS = dict(seq_len=512, block=32, window=128, layers=2, dim=128, heads=4, kv_heads=2, batch=8,
                    steps=200, lr=3e-3, dtype="f32")
GPU_DEFAULTS = dict(seq_len=2048, block=64, window=512, layers=6, dim=512, heads=8, kv_heads=2, batch=16,
                    steps=1000, lr=1e-3, dtype="bf16")


def backend():
    """The platform the steps run on: jax's default device where one is set (jax.default_device), else its backend."""
    dev = jax.config.jax_default_device
    if dev is None:
        return jax.default_backend()
    platform = dev if isinstance(dev, str) else dev.platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def parse_args(argv=None):
    on_gpu = backend() == "gpu"
    d = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens (bytes) per sequence")
    p.add_argument("--block", type=int, default=d["block"], help="block size R = C of the layout")
    p.add_argument("--window", type=int, default=d["window"], help="local attention window in tokens")
    p.add_argument("--layers", type=int, default=d["layers"])
    p.add_argument("--dim", type=int, default=d["dim"], help="model width")
    p.add_argument("--heads", type=int, default=d["heads"], help="query heads")
    p.add_argument("--kv-heads", type=int, default=d["kv_heads"], help="KV heads (GQA)")
    p.add_argument("--batch", type=int, default=d["batch"])
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d["dtype"], help="compute dtype (params are f32)")
    p.add_argument("--dense", action="store_true", help="jax.nn.dot_product_attention with the dense mask instead")
    p.add_argument("--corpus-mb", type=float, default=4.0, help="megabytes of stdlib source to read")
    p.add_argument("--devices", type=int, default=1,
                   help="data parallel over this many devices: the batch is split over a 1-D mesh, parameters and "
                        "optimizer state replicated; --batch is per device")
    p.add_argument("--seq-shards", type=int, default=1,
                   help="context parallel: of --devices, this many split each sequence (each runs its block rows of "
                        "the attention, k and v gathered), the rest the batch; --batch is per batch shard")
    p.add_argument("--ring", action="store_true",
                   help="with --seq-shards: k and v pass round the sequence shards instead of being gathered "
                        "(the op's context_parallel='ring')")
    p.add_argument("--zigzag", action="store_true",
                   help="with --seq-shards: the tokens held in the zigzag order, so that each sequence shard has an "
                        "early and a late chunk (causal work balanced; the op's zigzag_shards)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/train_lm", help="directory for loss.png, layout.png, metrics.json")
    args = p.parse_args(argv)
    if args.seq_shards < 1 or args.devices % args.seq_shards or args.seq_len % (args.seq_shards * args.block):
        p.error(f"--seq-shards ({args.seq_shards}) must divide --devices ({args.devices}), and --seq-len "
                f"({args.seq_len}) be a multiple of --seq-shards x --block ({args.block})")
    if args.zigzag and (args.seq_shards < 2 or args.dense or args.seq_len % (2 * args.seq_shards * args.block)):
        p.error(f"--zigzag needs --seq-shards >= 2, block-sparse attention and --seq-len ({args.seq_len}) a multiple "
                f"of 2 x --seq-shards x --block ({2 * args.seq_shards * args.block})")
    if args.dim % args.heads or args.heads % args.kv_heads:
        p.error(f"--dim ({args.dim}) must be a multiple of --heads ({args.heads}), and --heads of --kv-heads")
    if on_gpu and not args.dense:
        head_dim = args.dim // args.heads
        if head_dim not in (64, 128, 256) or args.dtype == "f32":
            p.error(f"the CUDA kernels take bf16/f16 and head dims 64/128/256; got --dtype {args.dtype}, "
                    f"head dim {head_dim} (= --dim / --heads)")
    return args


# ---- data ----------------------------------------------------------------------------------------------

def load_corpus(megabytes: float) -> np.ndarray:
    """Bytes of the standard library's top-level ``*.py`` files (sorted: the same text on every run)."""
    stdlib = os.path.dirname(os.__file__)
    chunks, size = [], 0
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, "rb") as f:
            chunks.append(f.read())
        size += len(chunks[-1])
        if size >= megabytes * 2 ** 20:
            break
    if size < 2 ** 16:
        sys.exit(f"found only {size} bytes of Python source under {stdlib}")
    return np.frombuffer(b"\n".join(chunks), np.uint8)


def batches(data: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator):
    """Random windows of ``seq_len + 1`` bytes: inputs and next-byte targets."""
    while True:
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
        x = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)
        yield x[:, :-1], x[:, 1:]


# ---- model ---------------------------------------------------------------------------------------------

class DenseAttention(BlockSparseMultiHeadAttention):
    """The same module with ``jax.nn.dot_product_attention`` on the layout's dense mask (and causality)."""

    def attend(self, q, k, v, layout, kv_lens=None):
        M, N = layout.seq_lens
        mask = layout.to_dense_mask() & (jnp.arange(N)[None, :] <= jnp.arange(M)[:, None] + (N - M))
        return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], scale=self.scale,
                                            key_value_seq_lengths=kv_lens)


class Block(nnx.Module):
    def __init__(self, args, layout, dtype, rngs):
        attn_cls = DenseAttention if args.dense else BlockSparseMultiHeadAttention
        self.norm1 = nnx.RMSNorm(args.dim, dtype=dtype, rngs=rngs)
        self.attn = attn_cls(args.heads, args.dim, num_kv_heads=args.kv_heads, layout=layout, causal=True,
                             rotary=True, dtype=dtype, rngs=rngs,
                             **({} if args.dense else dict(context_parallel="ring" if args.ring else "all_gather",
                                                           zigzag_shards=args.seq_shards if args.zigzag else None)))
        self.norm2 = nnx.RMSNorm(args.dim, dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(args.dim, 4 * args.dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(4 * args.dim, args.dim, use_bias=False, dtype=dtype, rngs=rngs,
                               kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * args.layers)))

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class ByteLM(nnx.Module):
    def __init__(self, args, layout, rngs):
        dtype = DTYPES[args.dtype]
        self.embed = nnx.Embed(256, args.dim, dtype=dtype, rngs=rngs)
        self.blocks = _List([Block(args, layout, dtype, rngs) for _ in range(args.layers)])
        self.norm = nnx.RMSNorm(args.dim, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(args.dim, 256, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).astype(jnp.float32)


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_step(model, x, y):
    return loss_fn(model, x, y)


# ---- main ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = load_corpus(args.corpus_mb)
    split = int(len(data) * 0.95)
    train, held_out = data[:split], data[split:]
    # Block-causal + local window, plus the first block as a global sink every query sees.
    T, R = args.seq_len, args.block
    layout = layouts.union(layouts.sliding_window(T, R, args.window),
                           layouts.global_local(T, R, 0, global_tokens=R, causal=True))
    print(f"backend {backend()}  corpus {len(data) / 2 ** 20:.1f} MB of stdlib source  "
          f"attention {'dense (jax.nn.dot_product_attention)' if args.dense else 'block-sparse'}  "
          f"layout {R}x{R} blocks, density {layout.density:.3f}")

    model = ByteLM(args, layout, nnx.Rngs(args.seed))
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10 + 1), args.steps,
                                                  end_value=args.lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    print(f"{args.layers} layers, dim {args.dim}, {args.heads} heads / {args.kv_heads} KV heads, "
          f"{n_params / 1e6:.2f}M params, batch {args.batch} x {T} tokens, {args.steps} steps, {args.dtype}")

    # Data parallel: a mesh of (batch shards, sequence shards), replicated parameters, the global batch split over
    # "data" and, with --seq-shards, each sequence over "seq". The attention op is partitioned over both
    # (custom_partitioning): each device runs the kernels on its batch shard's block rows.
    put = jnp.asarray
    data_shards = args.devices // args.seq_shards
    if args.devices > 1:
        from jax.sharding import AxisType, NamedSharding
        from jax.sharding import PartitionSpec as P
        devices = jax.devices(backend())
        if len(devices) < args.devices:
            raise SystemExit(f"--devices {args.devices}: only {len(devices)} devices ({devices})")
        mesh = jax.make_mesh((data_shards, args.seq_shards), ("data", "seq"), axis_types=(AxisType.Auto,) * 2,
                             devices=devices[:args.devices])
        state = nnx.state((model, optimizer))
        nnx.update((model, optimizer), jax.device_put(state, NamedSharding(mesh, P())))
        batch_sharding = NamedSharding(mesh, P("data", "seq"))
        # (--zigzag: tokens and labels alike in the zigzag order; the mean loss is the same)
        order = (lambda a: to_zigzag(a, args.seq_shards, axis=-1)) if args.zigzag else (lambda a: a)
        put = lambda a: jax.device_put(order(a), batch_sharding)
        print(f"data parallel over {data_shards} x {args.seq_shards} devices (batch x sequence): global batch "
              f"{args.batch * data_shards}")
    global_batch = args.batch * data_shards
    stream = batches(train, global_batch, T, np.random.default_rng(args.seed))
    losses, t_start, timed_tokens = [], None, 0
    use_bar = tqdm is not None and sys.stderr.isatty()       # a log file gets plain progress lines instead
    bar = tqdm(range(args.steps), desc="train", unit="step") if use_bar else range(args.steps)
    for step in bar:
        x, y = next(stream)
        loss = float(train_step(model, optimizer, put(x), put(y)))
        losses.append(loss)
        if step == 0:
            t_start = time.perf_counter()           # throughput excludes the first step (compilation)
        else:
            timed_tokens += x.size
        rate = timed_tokens / max(time.perf_counter() - t_start, 1e-9)
        if use_bar:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        elif step % max(1, args.steps // 20) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss:.4f}  {rate:,.0f} tokens/s", flush=True)
    elapsed = time.perf_counter() - t_start
    tokens_per_s = timed_tokens / elapsed if timed_tokens else float("nan")

    eval_stream = batches(held_out, global_batch, T, np.random.default_rng(args.seed + 1))
    eval_loss = float(np.mean([float(eval_step(model, *map(put, next(eval_stream)))) for _ in range(8)]))
    tail = float(np.mean(losses[-max(1, len(losses) // 10):]))
    print(f"loss: first {losses[0]:.4f} -> last 10% mean {tail:.4f}   held-out {eval_loss:.4f} "
          f"({eval_loss / math.log(2):.3f} bits/byte)")
    print(f"throughput: {tokens_per_s:,.0f} tokens/s (training, after compilation)")

    metrics = dict(args=vars(args), params=int(n_params), losses=losses, final_train_loss=tail,
                   held_out_loss=eval_loss, tokens_per_s=tokens_per_s, layout_density=layout.density,
                   backend=backend(), devices=args.devices)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    save_plots(args, losses, layout)
    return metrics


def save_plots(args, losses, layout):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(len(losses))
    ax.plot(steps, losses, alpha=0.35, label="train loss (per step)")
    k = max(1, len(losses) // 25)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1:], smooth, label=f"moving mean ({k} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(f"byte LM on stdlib source, {'dense' if args.dense else 'block-sparse'} attention")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss.png"), dpi=120)
    plt.close(fig)
    fig = layout.plot(title=f"layout: {args.block}x{args.block} blocks, density {layout.density:.3f}")
    fig.savefig(os.path.join(args.out, "layout.png"), dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}/loss.png, {args.out}/layout.png, {args.out}/metrics.json")


if __name__ == "__main__":
    main()
