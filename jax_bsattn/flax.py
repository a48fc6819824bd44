"""Flax integration: a block-sparse multi-head attention module (NNX) and an ``attention_fn`` adapter.

``import jax_bsattn.flax`` needs flax; ``import jax_bsattn`` does not.

- :class:`BlockSparseMultiHeadAttention`: q/k/v/out projections, GQA / MQA (``num_kv_heads``), optional rotary
  position embedding, logits soft cap; the layout is given at construction or at call time, as a
  :class:`~jax_bsattn.BlockSparseLayout` or as a callable of the sequence length (see :func:`resolve_layout`).
  For training and full-sequence inference (no autoregressive KV cache).
- :func:`make_attention_fn`: an ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` (and, since Linen passes
  only the keyword arguments a function accepts, ``flax.linen.MultiHeadDotProductAttention``). It honours
  ``is_causal`` and ``dtype``, and raises for what block-sparse attention cannot do: a dense ``mask`` or
  ``bias`` (including the one decode mode builds), attention dropout in training, ``sow_weights``.
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import block_sparse_attention, check_sequence_axis, check_zigzag_shards, is_ring, sequence_axes
from .layout import BlockSparseLayout
from .zigzag import to_zigzag

__all__ = ["BlockSparseMultiHeadAttention", "make_attention_fn", "resolve_layout", "apply_rotary"]

LayoutSpec = Union[BlockSparseLayout, Callable[..., BlockSparseLayout]]


def resolve_layout(layout: LayoutSpec | None, q_len: int, kv_len: int) -> BlockSparseLayout:
    """The layout for one call: ``layout`` itself, or ``layout(q_len)`` for self-attention lengths
    (``q_len == kv_len``) and ``layout((q_len, kv_len))`` otherwise -- the form the builders of
    :mod:`jax_bsattn.layouts` take, e.g. ``lambda L: layouts.sliding_window(L, 64, 256)``."""
    if layout is None:
        raise ValueError("no block-sparse layout: pass layout= at construction or at call time")
    if isinstance(layout, BlockSparseLayout):
        return layout
    if not callable(layout):
        raise TypeError(f"layout must be a BlockSparseLayout or a callable returning one, got {type(layout).__name__}")
    out = layout(q_len) if q_len == kv_len else layout((q_len, kv_len))
    if not isinstance(out, BlockSparseLayout):
        raise TypeError(f"the layout callable returned {type(out).__name__}, not a BlockSparseLayout")
    return out


def apply_rotary(x, positions, theta: float = 10000.0):
    """Rotary position embedding (RoFormer; the rotate-half / GPT-NeoX pairing) of ``x [..., L, H, D]``
    at integer ``positions [L]`` (or ``[..., L]``, broadcasting against x's leading dims: per-sequence positions); D
    must be even. Computed in float32, returned in x's dtype."""
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {D}")
    freqs = theta ** (-jnp.arange(0, D // 2, dtype=jnp.float32) * 2.0 / D)             # [D/2]
    angles = jnp.asarray(positions, jnp.float32)[..., None] * freqs                      # [..., L, D/2]
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]              # [..., L, 1, D/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class _Fixed:
    """A concrete layout held as a static module attribute (it is configuration, not state)."""

    def __init__(self, layout: BlockSparseLayout):
        self.layout = layout

    def __call__(self, *_):
        return self.layout


def _as_static(layout: LayoutSpec | None):
    return _Fixed(layout) if isinstance(layout, BlockSparseLayout) else layout


class BlockSparseMultiHeadAttention(nnx.Module):
    """Multi-head attention whose score matrix is block-sparse.

    Args:
      num_heads: query heads ``Hq``.
      in_features: input features of the queries (and of the keys/values unless ``kv_features`` is set).
      num_kv_heads: KV heads ``Hk`` (GQA; ``Hq % Hk == 0``); default ``num_heads``.
      head_dim: default ``in_features // num_heads`` (the CUDA kernels take 64, 128, 256).
      out_features: default ``in_features``.
      kv_features: input features of the keys/values for cross-attention; default ``in_features``.
      layout: a :class:`~jax_bsattn.BlockSparseLayout` or a callable of the sequence length
        (:func:`resolve_layout`); may be left out and given at call time instead.
      causal: mask ``j > i + (N - M)`` inside the listed blocks (bottom-right aligned).
      rotary: apply rotary position embedding to q and k (query ``i`` at position ``i + N - M``, key ``j``
        at ``j``), with base ``rope_theta``.
      scale: logits scale, default ``1 / sqrt(head_dim)``. logits_soft_cap: as the op.
      deterministic_backward: bitwise repeatable gradients (the op's ``deterministic``; dropout's
        ``deterministic`` is another thing).
      context_parallel: ``"all_gather"`` or ``"ring"``, the op's (with the sequence split over devices).
      zigzag_shards: the op's: the inputs (and outputs) hold the sequence in the zigzag order for this many shards
        (:mod:`jax_bsattn.zigzag`); the rotary positions follow it.
      sequence_axis: the op's, for the module inside ``jax.shard_map``: the inputs (and outputs) are this device's
        shards of sequences split over these mesh axes; the layout (a callable gets the whole lengths), the rotary
        positions, ``kv_lens`` and ``q_offset`` are the whole sequences'.
      use_bias: biases in the projections. dtype: dtype of the computation (q, k, v, the attention and the
        projections; default: the inputs'). param_dtype: of the parameters.
      kernel_init: initialiser of the projection kernels.
      rngs: ``nnx.Rngs`` for the initialisation.
    """

    def __init__(self, num_heads: int, in_features: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, out_features: int | None = None, kv_features: int | None = None,
                 layout: LayoutSpec | None = None, causal: bool = False, rotary: bool = False,
                 rope_theta: float = 10000.0, scale: float | None = None, logits_soft_cap: float | None = None,
                 deterministic_backward: bool = False, context_parallel: str = "all_gather",
                 zigzag_shards: int | None = None, sequence_axis=None, use_bias: bool = False, dtype=None,
                 param_dtype=jnp.float32, kernel_init=nnx.initializers.lecun_normal(), rngs: nnx.Rngs):
        self.num_heads = int(num_heads)
        self.num_kv_heads = int(num_kv_heads if num_kv_heads is not None else num_heads)
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if in_features % num_heads:
                raise ValueError(f"in_features ({in_features}) is not a multiple of num_heads ({num_heads}): "
                                 "pass head_dim")
            head_dim = in_features // num_heads
        self.head_dim = int(head_dim)
        if rotary and self.head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.layout = _as_static(layout)
        self.causal, self.rotary, self.rope_theta = bool(causal), bool(rotary), float(rope_theta)
        self.scale, self.logits_soft_cap, self.dtype = scale, logits_soft_cap, dtype
        self.deterministic_backward = bool(deterministic_backward)
        is_ring("context_parallel", context_parallel)          # (an error at construction, not at the first call)
        self.context_parallel = context_parallel
        check_zigzag_shards(zigzag_shards)
        self.zigzag_shards = zigzag_shards
        check_sequence_axis(sequence_axis)
        self.sequence_axis = sequence_axis
        kv_features = in_features if kv_features is None else kv_features
        out_features = in_features if out_features is None else out_features

        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=kernel_init, rngs=rngs)

        self.query = linear(in_features, self.num_heads * self.head_dim)
        self.key = linear(kv_features, self.num_kv_heads * self.head_dim)
        self.value = linear(kv_features, self.num_kv_heads * self.head_dim)
        self.out = linear(self.num_heads * self.head_dim, out_features)

    def __call__(self, inputs_q, inputs_kv=None, *, layout: LayoutSpec | None = None, kv_lens=None, q_offset=None):
        """``inputs_q [*B, M, in_features]`` (and ``inputs_kv [*B, N, kv_features]`` for cross-attention;
        default: self-attention) -> ``[*B, M, out_features]``. ``layout`` overrides the module's; ``kv_lens``
        (integers over ``*B``): each sequence's key length, the op's (a right-padded batch); ``q_offset`` (integers
        over ``*B``, causal modules): the key position of each sequence's first query row, the op's (a chunk of new
        rows: ``kv_lens - M``), which also places the queries' rotary positions."""
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        parts = 1 if self.sequence_axis is None else sequence_axes(self.sequence_axis)[1]
        M, N = inputs_q.shape[-2] * parts, inputs_kv.shape[-2] * parts     # (the whole sequences)
        lay = resolve_layout(layout if layout is not None else self.layout, M, N)
        q = self.query(inputs_q).reshape(inputs_q.shape[:-1] + (self.num_heads, self.head_dim))
        k = self.key(inputs_kv).reshape(inputs_kv.shape[:-1] + (self.num_kv_heads, self.head_dim))
        v = self.value(inputs_kv).reshape(inputs_kv.shape[:-1] + (self.num_kv_heads, self.head_dim))
        if self.rotary:
            first = N - M if q_offset is None else jnp.asarray(q_offset)[..., None]  # (per sequence: [*B, 1])
            q_pos, k_pos = jnp.arange(M) + first, jnp.arange(N)
            if self.zigzag_shards:                       # the tokens' positions in the order they are held
                q_pos, k_pos = (to_zigzag(p, self.zigzag_shards, axis=-1) for p in (q_pos, k_pos))
            if parts > 1:                                # this device's shard of them
                i = jax.lax.axis_index(sequence_axes(self.sequence_axis)[0])
                q_pos, k_pos = (jax.lax.dynamic_slice_in_dim(p, i * (n // parts), n // parts, axis=-1)
                                for p, n in ((q_pos, M), (k_pos, N)))
            q = apply_rotary(q, q_pos, self.rope_theta)
            k = apply_rotary(k, k_pos, self.rope_theta)
        # (kv_lens and q_offset passed only when given: a subclass's attend(q, k, v, layout) from before them still
        # works)
        extra = {name: x for name, x in (("kv_lens", kv_lens), ("q_offset", q_offset)) if x is not None}
        o = self.attend(q, k, v, lay, **extra)
        return self.out(o.reshape(o.shape[:-2] + (self.num_heads * self.head_dim,)))

    def attend(self, q, k, v, layout: BlockSparseLayout, kv_lens=None, q_offset=None):
        """The attention proper, ``[*B, M, Hq, D]`` from q and ``[*B, N, Hk, D]`` k, v (after rotary): the
        hook a subclass overrides to compare with another implementation on the same model."""
        return block_sparse_attention(q, k, v, layout, scale=self.scale, causal=self.causal,
                                      logits_soft_cap=self.logits_soft_cap,
                                      deterministic=self.deterministic_backward, kv_lens=kv_lens, q_offset=q_offset,
                                      context_parallel=self.context_parallel, zigzag_shards=self.zigzag_shards,
                                      sequence_axis=self.sequence_axis)


def make_attention_fn(layout: LayoutSpec, *, causal: bool = False, scale: float | None = None,
                      logits_soft_cap: float | None = None, deterministic_backward: bool = False,
                      context_parallel: str = "all_gather", zigzag_shards: int | None = None,
                      sequence_axis=None):
    """An ``attention_fn`` for ``flax.nnx.MultiHeadAttention(attention_fn=...)`` (same keyword arguments as
    ``flax.nnx.dot_product_attention``) computing block-sparse attention with ``layout``.

    q, k, v come as ``[*B, len, heads, head_dim]`` (GQA when ``num_kv_heads < num_heads``). Honoured:
    ``is_causal`` (or'ed with ``causal``; flax aligns it top-left, so with q and kv lengths that differ it is an
    error, where ``causal`` means the op's bottom-right mask), ``dtype`` (q, k, v cast to it; default: their
    common dtype), ``dropout_rate`` when ``deterministic`` (no dropout happens then). Ignored: ``precision``,
    ``broadcast_dropout`` (the kernels always accumulate in float32). Errors (``ValueError``): a dense
    ``mask`` or ``bias`` -- express the pattern as a layout (``BlockSparseLayout.from_block_mask``); this
    includes ``decode=True``, which masks its KV cache with a dense mask -- attention dropout in training
    (``dropout_rate > 0`` and not ``deterministic``), and ``module`` (``sow_weights=True``: the attention
    weights are never materialised). ``deterministic_backward``: the op's ``deterministic`` (bitwise
    repeatable gradients; the ``deterministic`` argument is dropout's). ``context_parallel``: the op's.
    ``zigzag_shards``: the op's: the sequence comes (and o leaves) in the zigzag order for this many shards
    (:mod:`jax_bsattn.zigzag`); whatever gives the tokens their positions (embeddings) must follow the same order.
    ``sequence_axis``: the op's (inside ``jax.shard_map``: q, k, v are this device's shards; a callable layout gets
    the whole lengths).
    """
    is_ring("context_parallel", context_parallel)
    check_zigzag_shards(zigzag_shards)
    check_sequence_axis(sequence_axis)

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                     dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                     promote_dtype=None, is_causal=False, force_fp32_for_softmax=False):
        del broadcast_dropout, dropout_rng, precision, force_fp32_for_softmax
        if mask is not None:
            raise ValueError(
                "jax_bsattn attention_fn: a dense attention mask cannot be honoured; express the pattern as a "
                "BlockSparseLayout (BlockSparseLayout.from_block_mask, jax_bsattn.layouts) and use causal / "
                "is_causal for causality (autoregressive decode=True, which masks its KV cache densely, is not "
                "supported)")
        if bias is not None:
            raise ValueError("jax_bsattn attention_fn: an additive attention bias is not supported")
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError(
                f"jax_bsattn attention_fn: attention dropout (dropout_rate={dropout_rate}) is not supported in "
                "training; use dropout_rate=0 (or deterministic=True at inference)")
        if module is not None:
            raise ValueError("jax_bsattn attention_fn: sow_weights=True is not supported: block-sparse attention "
                             "never materialises the attention weights")
        if promote_dtype is not None:
            query, key, value = promote_dtype((query, key, value), dtype=dtype)
        else:
            dtype = jnp.result_type(query, key, value) if dtype is None else dtype
            query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
        if is_causal and query.shape[-3] != key.shape[-3]:
            raise ValueError(
                f"jax_bsattn attention_fn: is_causal with q length {query.shape[-3]} != kv length {key.shape[-3]}: "
                "flax's causal mask is top-left aligned (j <= i), jax_bsattn's bottom-right (j <= i + N - M), so the "
                "two differ; for the bottom-right mask pass causal=True to make_attention_fn instead")
        parts = 1 if sequence_axis is None else sequence_axes(sequence_axis)[1]
        lay = resolve_layout(layout, query.shape[-3] * parts, key.shape[-3] * parts)
        return block_sparse_attention(query, key, value, lay, scale=scale, causal=bool(causal or is_causal),
                                      logits_soft_cap=logits_soft_cap, deterministic=deterministic_backward,
                                      context_parallel=context_parallel, zigzag_shards=zigzag_shards,
                                      sequence_axis=sequence_axis)

    return attention_fn
