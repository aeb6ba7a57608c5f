"""The decoder: forward and backward composed from ``minift.layers``, top-down and readable.

Llama family (Llama, Mistral, Qwen2, Qwen3), per block:

    h = norm(x);  q, k, v = q(h), k(h), v(h);  q, k = rope(q), rope(k)
    x = x + o(attention(q, k, v))        (Qwen3: q, k = rope(q_norm(q)), rope(k_norm(k)) per head)
    h = norm(x);  x = x + down(silu(gate(h)) ⊙ up(h))          (GPT-2: down(gelu(up(h))))

Gemma 3 starts from x = E[ids]·√C, scales every norm by (1 + w), has q/k norms, and normalises each
branch's output again before the residual add (``post_attn_norm``, ``post_mlp_norm``):

    x = x + post_attn_norm(o(attention(rope(q_norm(q)), rope(k_norm(k)), v)))
    x = x + post_mlp_norm(down(gelu(gate(h)) ⊙ up(h))),   h = mlp_norm(x)

then logits = lm_head(norm(x)), or x Eᵀ with tied embeddings. Every projection is a linear slot
(``minift.slots``), so fine-tuning methods change what the slots keep and return, never this file.

Partial backpropagation follows from two rules:
1. blocks below the lowest one with a trainable array run in inference mode and keep no cache;
2. the backward stops after that block, and frozen slots compute dx only.

What a block keeps is the least its backward needs (``BlockCache``, one rule per op): the attention
keeps q, k, v and one log-sum-exp per query row; an MLP whose gate and up are frozen keeps only its
norm's input and down's cache (``lean_mlp``); the lowest trainable block keeps no attention cache
when nothing below it needs dx (``attention_backward_needed``); ``loss_and_grads`` runs the LM head
and the loss fused, by rows (``head_loss_and_backward``). With activation checkpointing a block keeps
only its input (``BlockCheckpoint``).

Gradients come back as a dict keyed by parameter path, the same keys as ``trainable_parameters``.
Tutorial: tutorials/04_decoder_and_training_step.py.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from minift.backend import Array, block_size, get_xp
from minift.config import ModelConfig
from minift.errors import DataError, ShapeError
from minift.layers.attention import AttentionCache, attention_backward, attention_forward, causal_mask
from minift.layers.cross_entropy import IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward
from minift.layers.geglu import GeGLUCache, geglu_backward, geglu_forward
from minift.layers.gelu import gelu_backward, gelu_forward
from minift.layers.linear import linear_backward_input, linear_backward_weight, linear_forward
from minift.layers.rope import rope_backward, rope_forward, rope_tables
from minift.layers.swiglu import SwiGLUCache, swiglu_backward, swiglu_forward
from minift.slots import Dense, Embedding, Grads, LinearSlot, Norm

SLOT_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


class SlotShape(NamedTuple):
    """A linear slot's weight (O, I) and whether it has a bias (O,)."""

    out_features: int
    in_features: int
    bias: bool


def slot_shapes(config: ModelConfig) -> dict[str, SlotShape]:
    """The one table of a block's linear slots, in ``SLOT_NAMES`` order; GPT-2 has no gate.

        q: (H·D, C)   k, v: (K·D, C)   o: (C, H·D)   gate, up: (F, C)   down: (C, F)

    ``init_model``, ``minift.io.hub`` (the arrays of a checkpoint) and the methods' parameter budgets
    read their shapes from here.
    """
    c = config
    C, F, H, K, D = c.hidden_size, c.intermediate_size, c.n_heads, c.n_kv_heads, c.head_dim
    assert K is not None
    assert D is not None
    shapes = {
        "q": SlotShape(H * D, C, c.qkv_bias),
        "k": SlotShape(K * D, C, c.qkv_bias),
        "v": SlotShape(K * D, C, c.qkv_bias),
        "o": SlotShape(C, H * D, c.o_bias),
        "gate": SlotShape(F, C, c.mlp_bias),
        "up": SlotShape(F, C, c.mlp_bias),
        "down": SlotShape(C, F, c.mlp_bias),
    }
    if c.arch == "gpt2":
        del shapes["gate"]
    return shapes


@dataclass(eq=False)
class Block:
    """One transformer block's parameters: two norms and seven linear slots (GPT-2: no gate)."""

    attn_norm: Norm
    q: LinearSlot  # (H·D, C)
    k: LinearSlot  # (K·D, C)
    v: LinearSlot  # (K·D, C)
    o: LinearSlot  # (C, H·D)
    mlp_norm: Norm
    gate: LinearSlot | None  # (F, C); None for GPT-2's GELU MLP
    up: LinearSlot  # (F, C)
    down: LinearSlot  # (C, F)
    q_norm: Norm | None = None  # (D,) Qwen3, Gemma 3: RMSNorm of each query head, shared by all heads
    k_norm: Norm | None = None  # (D,) and of each key head
    post_attn_norm: Norm | None = None  # (C,) Gemma 3: the attention branch's output, before the add
    post_mlp_norm: Norm | None = None  # (C,) Gemma 3: the MLP branch's output, before the add

    def norms(self) -> Iterator[tuple[str, Norm]]:
        """(name, norm) for each norm present: attn_norm, mlp_norm, then q_norm, k_norm, post_attn_norm
        and post_mlp_norm if any."""
        for name in ("attn_norm", "mlp_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm"):
            norm = getattr(self, name)
            if norm is not None:
                yield name, norm

    def slots(self) -> Iterator[tuple[str, LinearSlot]]:
        """(name, slot) for each linear slot present, in SLOT_NAMES order."""
        for name in SLOT_NAMES:
            slot = getattr(self, name)
            if slot is not None:
                yield name, slot


@dataclass(eq=False)
class Model:
    """A decoder-only transformer: its config and its parameters, slot by slot."""

    config: ModelConfig
    embed: Embedding  # (V, C)
    blocks: list[Block]
    final_norm: Norm
    lm_head: LinearSlot | None  # (V, C); None when tied to ``embed``
    pos_embed: Embedding | None = None  # (P, C), GPT-2's learned positions
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the S2FT permutation, the source path

    @property
    def dtype(self) -> np.dtype:
        return self.embed.weight.dtype


@dataclass(eq=False)
class BlockCache:
    """What one block's backward needs, op by op. Mutable so that the backward can drop each entry as
    soon as it is used (``_take``): a block's caches are freed while its backward runs, not after."""

    attn_norm: Any  # input x and rstd (x̂ is recomputed); None when the attention's backward is skipped
    q: Any  # the slots' own caches: nothing for a frozen dense slot
    k: Any
    v: Any
    attn: AttentionCache | None  # q, k, v after RoPE and the row log-sum-exp (p is recomputed); None
    # in a block whose backward stops at O (``attention_backward_needed``)
    o: Any
    mlp_norm: Any  # a ``lean_mlp`` rebuilds h, g and u from this input
    gate: Any
    up: Any
    act: SwiGLUCache | GeGLUCache | Array | None  # gate/up pre-activations (the activation is
    # recomputed), or GELU's input; None for a ``lean_mlp``
    down: Any  # a ``lean_mlp``: a list, down's cache of each row chunk
    q_norm: Any = None  # the q/k norms' caches (Qwen3, Gemma 3)
    k_norm: Any = None
    post_attn_norm: Any = None  # the post-norms' caches (Gemma 3)
    post_mlp_norm: Any = None


@dataclass(eq=False)
class BlockCheckpoint:
    """An activation-checkpointed block: only its input is kept, and the backward reruns the block's
    forward from it (Chen et al. 2016, "Training deep nets with sublinear memory cost", §3)."""

    x: Array  # (N, C) the block's input on the residual stream
    rng_state: dict[str, Any] | None  # the slots' RNG state before the block, to redraw the same dropout


class ModelCache(NamedTuple):
    tokens: Array  # (B, T) integer
    positions: Array  # (B, T) integer
    rope: dict[Any, tuple[Array, Array]] | None  # cos, sin (B, 1, T, D) by (θ, scaling); None for GPT-2
    blocks: list[BlockCache | BlockCheckpoint | None]  # None below the lowest trainable block
    final_norm: Any
    x_final: Array  # (N, C) normalised final hidden state, kept for the LM head's weight gradient
    head: Any
    lowest: int  # index of the lowest block the backward must reach (L when none)
    masks: dict[int | None, Array] | None = None  # attention masks by window, to rerun checkpointed blocks


@dataclass
class KVCache:
    """Rotated keys and values of the positions seen so far, per block (inference only)."""

    keys: list[Array | None]  # per block (B, K, P, D)
    values: list[Array | None]

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([None] * n_layers, [None] * n_layers)

    @property
    def length(self) -> int:
        """P, the number of cached positions."""
        return 0 if self.keys[0] is None else int(self.keys[0].shape[2])


# ----------------------------------------------------------------------------------------------------
# parameters


def init_model(
    config: ModelConfig, rng: np.random.Generator, *, dtype: Any = np.float32, std: float = 0.02, xp: Any = np
) -> Model:
    """A model with N(0, std²) weights, zero biases and unit norm weights (GPT-2/Llama style init).

    Random numbers come from the host ``rng``; arrays are then created on ``xp`` (numpy or cupy).
    """
    c = config
    C, V = c.hidden_size, c.vocab_size
    slots = slot_shapes(c)  # drawn in SLOT_NAMES order, as the blocks list them

    def normal(*shape: int) -> Array:
        return xp.asarray(rng.normal(0.0, std, size=shape).astype(dtype))

    def zeros_if(flag: bool, n: int) -> Array | None:
        return xp.zeros(n, dtype=dtype) if flag else None

    def norm(n: int = C, *, per_head: bool = False) -> Norm:  # unit scale: w = 1, or w = 0 under 1 + w
        bias = xp.zeros(C, dtype=dtype) if c.arch == "gpt2" else None
        weight = (xp.zeros if c.gemma else xp.ones)(n, dtype=dtype)
        return Norm(weight, bias, c.norm_eps, per_head=per_head, unit_offset=c.gemma)

    blocks = [
        Block(
            attn_norm=norm(),
            mlp_norm=norm(),
            **{name: None for name in SLOT_NAMES}
            | {name: Dense(normal(o, i), zeros_if(bias, o)) for name, (o, i, bias) in slots.items()},
            q_norm=norm(c.head_dim, per_head=True) if c.qk_norm else None,
            k_norm=norm(c.head_dim, per_head=True) if c.qk_norm else None,
            post_attn_norm=norm() if c.gemma else None,
            post_mlp_norm=norm() if c.gemma else None,
        )
        for _ in range(c.n_layers)
    ]
    return Model(
        config=c,
        embed=Embedding(normal(V, C)),
        blocks=blocks,
        final_norm=norm(),
        lm_head=None if c.tie_word_embeddings else Dense(normal(V, C)),
        pos_embed=Embedding(normal(c.max_position_embeddings, C)) if c.arch == "gpt2" else None,
    )


def named_modules(model: Model) -> Iterator[tuple[str, Any]]:
    """(path, holder) for every parameter holder: embeddings, norms and linear slots."""
    yield "embed", model.embed
    if model.pos_embed is not None:
        yield "pos_embed", model.pos_embed
    for i, block in enumerate(model.blocks):
        for name, norm in block.norms():
            yield f"blocks.{i}.{name}", norm
        for name, slot in block.slots():
            yield f"blocks.{i}.{name}", slot
    yield "final_norm", model.final_norm
    if model.lm_head is not None:
        yield "lm_head", model.lm_head


def trainable_parameters(model: Model) -> dict[str, Array]:
    """Every trainable array by path, e.g. ``blocks.3.o.weight``; the keys of the gradient dict."""
    return {
        f"{path}.{name}": array
        for path, holder in named_modules(model)
        for name, array in holder.parameters().items()
    }


def set_trainable(model: Model, requires_grad: bool = True) -> Model:
    """Make every dense array trainable (full fine-tuning) or frozen; returns the same model."""
    for _, holder in named_modules(model):
        if isinstance(holder, Dense | Norm | Embedding):
            holder.requires_grad = requires_grad
    return model


def embeddings_trainable(model: Model) -> bool:
    """Whether the token (or GPT-2's position) embedding is trained: then dx must reach block 0's input."""
    pos = model.pos_embed
    return bool(model.embed.parameters()) or (pos is not None and bool(pos.parameters()))


def lowest_trainable_block(model: Model) -> int:
    """Index of the lowest block the backward must reach: 0 when an embedding is trainable, L if none."""
    if embeddings_trainable(model):
        return 0
    for i, block in enumerate(model.blocks):
        holders = [*(n for _, n in block.norms()), *(s for _, s in block.slots())]
        if any(h.parameters() for h in holders):
            return i
    return len(model.blocks)


# ----------------------------------------------------------------------------------------------------
# forward


def _rng_state(rng: np.random.Generator | None) -> dict[str, Any] | None:
    return None if rng is None else copy.deepcopy(rng.bit_generator.state)


def _rng_from_state(state: dict[str, Any] | None) -> np.random.Generator | None:
    """A generator that draws what the one whose state this was drew next (the original moves on)."""
    if state is None:
        return None
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def default_positions(tokens: Array, attention_mask: Array | None, past: int) -> Array:
    """Position ids: past, past+1, … ; with a padding mask, counted over real tokens only
    (cumsum(mask) − 1, as Hugging Face generation does), so left padding does not shift positions.

    Shapes:
        tokens: (B, T)   attention_mask: (B, past + T)   returns: (B, T)
    """
    xp = get_xp(tokens)
    B, T = tokens.shape
    if attention_mask is None:
        return xp.broadcast_to(xp.arange(past, past + T), (B, T))
    pos = xp.cumsum(attention_mask, axis=-1) - 1
    return xp.maximum(pos, 0)[:, past:]


ROW_CHUNK = 256  # tokens per chunk of a ``lean_mlp`` and of the fused LM head and loss (on the host)


def lean_mlp(block: Block) -> bool:
    """Whether the block's MLP is a SwiGLU without a post-norm whose gate and up are frozen (S2FT on
    Down, say).

    Such an MLP runs ``ROW_CHUNK`` tokens at a time and keeps only its norm's cache and down's cache
    of each chunk, not gate's and up's outputs g and u: its backward needs them only to pass dx
    through SwiGLU, and rebuilds them chunk by chunk from the norm's kept input (two (n, C)·(C, F)
    products per chunk, the forward's own). That trades two of the block's nine products for the
    2·N·F values that otherwise dominate what the block keeps. A trainable gate or up keeps its input
    h for its own dW anyway; there g and u are kept, for recomputing them would add the same products
    to every step of methods whose memory is mostly gradients and optimizer state or adapter inputs.
    """
    frozen = block.gate is not None and not block.gate.parameters() and not block.up.parameters()
    # an RMSNorm, whose cache holds its input x; Gemma 3's GeGLU and post-norm keep the plain path
    return frozen and block.mlp_norm.bias is None and block.post_mlp_norm is None


def attention_backward_needed(block: Block, need_dx: bool) -> bool:
    """Whether the backward must go through the block's attention (beyond O's own weight gradient):
    when dx is needed below, or when anything before O (norms, q, k, v) is trainable. The lowest
    trainable block of an S2FT model on O and Down needs neither: it keeps no q, k, v, no
    log-sum-exp and no norm input, and its backward stops at O."""
    holders = [block.attn_norm, block.q, block.k, block.v, block.q_norm, block.k_norm]
    return need_dx or any(h is not None and h.parameters() for h in holders)


def attention_sublayer(
    block: Block,
    x: Array,
    shape: tuple[int, int],
    rope: tuple[Array, Array] | None,
    allowed: Array,
    config: ModelConfig,
    *,
    keep: bool,
    rng: np.random.Generator | None = None,
    past: tuple[Array, Array] | None = None,
    keep_attention: bool = True,
) -> tuple[Array, BlockCache | None, tuple[Array, Array]]:
    """x + o(attention(rope(q(h)), rope(k(h)), v(h))), h = attn_norm(x) (Qwen3, Gemma 3: q/k norms
    before RoPE; Gemma 3: post_attn_norm on o's output): (x, the attention half of
    the block's cache or None, this block's (k, v)). ``keep_attention=False``: keep only O's cache
    (see ``attention_backward_needed``).

    Shapes:
        x: (N, C) with N = B·T   allowed: (B|1, 1, 1, T, S)   returns x: (N, C), k, v: (B, K, S, D)
    """
    xp = get_xp(x)
    B, T = shape
    H, K, D = config.n_heads, config.n_kv_heads, config.head_dim
    below = keep and keep_attention  # the ops below O keep their caches only if their backward runs
    h, c_n1 = block.attn_norm.forward(x, keep=below)
    q, c_q = block.q.forward(h, keep=below, rng=rng)  # (N, H·D)
    k, c_k = block.k.forward(h, keep=below, rng=rng)  # (N, K·D)
    v, c_v = block.v.forward(h, keep=below, rng=rng)
    c_qn = c_kn = None
    if block.q_norm is not None and block.k_norm is not None:  # over each head's D values
        q, c_qn = block.q_norm.forward(q, keep=below)
        k, c_kn = block.k_norm.forward(k, keep=below)
    q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    k = k.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # (B, K, T, D)
    v = v.reshape(B, T, K, D).transpose(0, 2, 1, 3)
    if rope is not None:
        q, k = rope_forward(q, *rope), rope_forward(k, *rope)
    if past is not None:
        k = xp.concatenate([past[0], k], axis=2)  # (B, K, S, D)
        v = xp.concatenate([past[1], v], axis=2)
    a, c_att = attention_forward(q, k, v, allowed, scale=config.attention_scale)  # (B, H, T, D)
    a = a.transpose(0, 2, 1, 3).reshape(B * T, H * D)  # (N, H·D)
    y, c_o = block.o.forward(a, keep=keep, rng=rng)
    c_pa = None
    if block.post_attn_norm is not None:
        y, c_pa = block.post_attn_norm.forward(y, keep=keep)
    x = x + y
    if not keep:
        return x, None, (k, v)
    cache = BlockCache(c_n1, c_q, c_k, c_v, c_att if below else None, c_o, None, None, None, None, None,
                       c_qn, c_kn, c_pa)
    return x, cache, (k, v)


def mlp_sublayer(
    block: Block,
    x: Array,
    cache: BlockCache | None,
    config: ModelConfig,
    *,
    rng: np.random.Generator | None = None,
) -> Array:
    """x + down(silu(gate(h)) ⊙ up(h)), h = mlp_norm(x) (GPT-2: down(gelu(up(h))); Gemma 3:
    post_mlp_norm(down(gelu(gate(h)) ⊙ up(h)))); fills the MLP
    half of ``cache`` when one is given (training). A ``lean_mlp`` keeps only the norm's and down's
    caches.

    Shapes:
        x: (N, C)   returns: (N, C)
    """
    keep = cache is not None
    h, c_n2 = block.mlp_norm.forward(x, keep=keep)
    if keep and lean_mlp(block):
        y, cache.down = _lean_mlp_forward(block, h, rng)
        cache.mlp_norm = c_n2
        return x + y
    u, c_u = block.up.forward(h, keep=keep, rng=rng)  # (N, F)
    if block.gate is not None:
        g, c_g = block.gate.forward(h, keep=keep, rng=rng)
        m, c_act = _glu(config)[0](g, u)
        del g, u
    else:
        c_g, m, c_act = None, gelu_forward(u), u
    y, c_d = block.down.forward(m, keep=keep, rng=rng)  # (N, C)
    c_pm = None
    if block.post_mlp_norm is not None:
        y, c_pm = block.post_mlp_norm.forward(y, keep=keep)
    if cache is not None:
        cache.mlp_norm, cache.gate, cache.up, cache.act, cache.down = c_n2, c_g, c_u, c_act, c_d
        cache.post_mlp_norm = c_pm
    return x + y


def _row_chunks(n: int, xp: ModuleType, width: int) -> Iterator[slice]:
    """Consecutive row ranges of ``ROW_CHUNK`` tokens covering n rows (on a GPU, ``block_size`` rows of
    a ``width``-wide temporary)."""
    size = block_size(xp, ROW_CHUNK, width)
    return (slice(a, a + size) for a in range(0, n, size))


def _lean_mlp_forward(block: Block, h: Array, rng: np.random.Generator | None) -> tuple[Array, list[Any]]:
    """down(silu(gate(h)) ⊙ up(h)) of a ``lean_mlp``, by row chunks: (y, down's cache of each chunk).
    Only a chunk's g, u and m exist at a time.

    Shapes:
        h: (N, C)   returns y: (N, C)
    """
    assert block.gate is not None
    y = get_xp(h).empty_like(h)  # down maps back to the model width C
    downs = []
    for rows in _row_chunks(h.shape[0], get_xp(h), block.gate.out_features):
        g, _ = block.gate.forward(h[rows], keep=False)  # frozen: nothing to keep, nothing drawn
        u, _ = block.up.forward(h[rows], keep=False)
        m, _ = swiglu_forward(g, u)
        del g, u
        y[rows], c_d = block.down.forward(m, keep=True, rng=rng)
        downs.append(c_d)
    return y, downs


def _glu(config: ModelConfig) -> tuple[Any, Any]:
    """The gated MLP's non-linearity, as a forward/backward pair: GeGLU (Gemma 3) or SwiGLU (Llama)."""
    return (geglu_forward, geglu_backward) if config.gemma else (swiglu_forward, swiglu_backward)


def embed_scale(config: ModelConfig, dtype: Any) -> Array | None:
    """Gemma 3's embedding multiplier √C, or None. transformers keeps it as a float32 scalar and casts
    it to the weights' dtype, so it is rounded to float32 first here too (bf16 would round it again).

    Shapes:
        returns: () of ``dtype``
    """
    if not config.gemma:
        return None
    return np.float32(config.hidden_size**0.5).astype(dtype)


def block_forward(
    block: Block,
    x: Array,
    shape: tuple[int, int],
    rope: tuple[Array, Array] | None,
    allowed: Array,
    config: ModelConfig,
    *,
    keep: bool,
    rng: np.random.Generator | None = None,
    past: tuple[Array, Array] | None = None,
    keep_attention: bool = True,
) -> tuple[Array, BlockCache | None, tuple[Array, Array]]:
    """One block on the residual stream x, attention then MLP; returns (x, cache or None, this
    block's (k, v)).

    Shapes:
        x: (N, C) with N = B·T   allowed: (B|1, 1, 1, T, S)   returns x: (N, C), k, v: (B, K, S, D)
    """
    x, cache, kv = attention_sublayer(block, x, shape, rope, allowed, config, keep=keep, rng=rng, past=past,
                                      keep_attention=keep_attention)
    return mlp_sublayer(block, x, cache, config, rng=rng), cache, kv


def model_forward(
    model: Model,
    tokens: Array,
    *,
    attention_mask: Array | None = None,
    positions: Array | None = None,
    kv_cache: KVCache | None = None,
    train: bool = True,
    rng: np.random.Generator | None = None,
    checkpoint: bool = False,
    head: bool = True,
) -> tuple[Array, ModelCache | None]:
    """Logits for every position; with ``train=True`` also the cache the backward needs.
    ``head=False`` stops before the LM head: the final norm's output (B, T, C) instead of the logits
    (``loss_and_grads`` runs the head fused with the loss, by rows).

    ``checkpoint=True`` (activation checkpointing) keeps only each trained block's input; the backward
    reruns the block's forward from it. Blocks below the lowest trainable one keep nothing either way.

    ``attention_mask`` (1 = token, 0 = padding) covers the cached positions too when a ``kv_cache`` is
    given; the cache is extended in place with this call's keys and values.

    Shapes:
        tokens: (B, T) integer   attention_mask: (B, P + T)   positions: (B, T)
        returns logits: (B, T, V)
    """
    c = model.config
    xp = get_xp(model.embed.weight)
    if tokens.ndim != 2:
        raise ShapeError(f"tokens must be (B, T), got shape {tokens.shape}")
    # NOTE: an id outside [0, V) must fail here: NumPy reads E[−1] as the last row and CuPy does not
    # check bounds at all, so the lookup itself would silently return a wrong embedding.
    lo, hi = (int(tokens.min()), int(tokens.max())) if tokens.size else (0, 0)
    if lo < 0 or hi >= c.vocab_size:
        raise DataError(f"token ids must lie in [0, {c.vocab_size}), got ids from {lo} to {hi}")
    B, T = tokens.shape
    past = kv_cache.length if kv_cache is not None else 0
    if attention_mask is not None and attention_mask.shape != (B, past + T):
        raise ShapeError(f"attention_mask must be (B, P + T) = {(B, past + T)}, got {attention_mask.shape}")
    if positions is None:
        positions = default_positions(tokens, attention_mask, past)
    lowest = lowest_trainable_block(model) if train else len(model.blocks)

    x = model.embed.forward(tokens)  # (B, T, C)
    scale = embed_scale(c, x.dtype)
    if scale is not None:
        x = x * scale
    ropes = None
    if c.uses_rope:  # one table per distinct (θ, scaling): Gemma 3's sliding layers have their own
        ropes = {}
        for theta, scaling in {c.rope(i) for i in range(c.n_layers)}:
            cos, sin = rope_tables(positions, c.head_dim, theta, scaling)
            ropes[theta, scaling] = (cos.astype(x.dtype), sin.astype(x.dtype))
    else:
        assert model.pos_embed is not None
        n_pos = model.pos_embed.weight.shape[0]
        if positions.size and int(positions.max()) >= n_pos:  # the lookup would fail or wrap silently
            raise ShapeError(f"position {int(positions.max())} is past the {n_pos} learned positions "
                             "(max_position_embeddings): shorten the sequence")
        x = x + model.pos_embed.forward(positions)
    x = x.reshape(B * T, -1)  # (N, C)
    masks = {w: causal_mask(T, past + T, attention_mask, window=w, xp=xp)  # one per distinct window
             for w in {c.window(i) for i in range(c.n_layers)}}

    need_embed = embeddings_trainable(model)
    caches: list[BlockCache | BlockCheckpoint | None] = []
    for i, block in enumerate(model.blocks):
        kv = (kv_cache.keys[i], kv_cache.values[i]) if kv_cache is not None and past else None
        keep = train and i >= lowest
        allowed = masks[c.window(i)]
        saved = BlockCheckpoint(x, _rng_state(rng)) if keep and checkpoint else None
        # A checkpointed block still runs in training mode (keep=True: e.g. dropout is drawn), and its
        # cache is dropped at once: only one block's cache exists at a time.
        rope = None if ropes is None else ropes[c.rope(i)]
        below = keep and attention_backward_needed(block, i > lowest or need_embed)
        x, cache, (k, v) = block_forward(block, x, (B, T), rope, allowed, c, keep=keep, rng=rng, past=kv,
                                         keep_attention=below)
        caches.append(cache if saved is None else saved)
        del cache
        if kv_cache is not None:
            kv_cache.keys[i], kv_cache.values[i] = k, v

    x, c_fn = model.final_norm.forward(x, keep=train)
    if not head:
        cache = ModelCache(tokens, positions, ropes, caches, c_fn, x, None, lowest, masks) if train else None
        return x.reshape(B, T, -1), cache
    if model.lm_head is None:
        logits, c_head = linear_forward(x, model.embed.weight), None  # tied: logits = x Eᵀ
    else:
        logits, c_head = model.lm_head.forward(x, keep=train, rng=rng)
    logits = logits.reshape(B, T, -1)  # (B, T, V)
    if not train:
        return logits, None
    return logits, ModelCache(tokens, positions, ropes, caches, c_fn, x, c_head, lowest, masks)


# ----------------------------------------------------------------------------------------------------
# backward


def _collect(grads: Grads, prefix: str, local: Grads) -> None:
    for name, g in local.items():
        grads[f"{prefix}.{name}"] = g


def _take(cache: BlockCache, name: str) -> Any:
    """The entry ``name`` of the cache, removed from it: it is freed as soon as its user is done."""
    value = getattr(cache, name)
    setattr(cache, name, None)
    return value


def mlp_backward(
    block: Block, dx: Array, cache: BlockCache, config: ModelConfig, grads: Grads, prefix: str
) -> Array:
    """The MLP half reversed: returns dx (N, C) below it, the residual included (a ``lean_mlp``:
    ``lean_mlp_backward``)."""
    if lean_mlp(block):
        downs = list(_take(cache, "down"))  # a list of our own, emptied chunk by chunk
        return lean_mlp_backward(block, dx, _take(cache, "mlp_norm"), downs, grads, prefix)
    # x = x + post_mlp_norm(down(act(gate(h), up(h)))),  h = mlp_norm(x); no post-norm but Gemma's
    dy = dx
    if block.post_mlp_norm is not None:
        dy, g = block.post_mlp_norm.backward(dx, _take(cache, "post_mlp_norm"))
        _collect(grads, f"{prefix}.post_mlp_norm", g)
    dm, g = block.down.backward(dy, _take(cache, "down"))
    del dy
    _collect(grads, f"{prefix}.down", g)
    if block.gate is None:  # GPT-2: down(gelu(up(h)))
        du = gelu_backward(dm, _take(cache, "act"))
        dh = 0.0
    else:
        dg, du = _glu(config)[1](dm, _take(cache, "act"))
        dh, g = block.gate.backward(dg, _take(cache, "gate"))
        _collect(grads, f"{prefix}.gate", g)
        del dg
    del dm
    dh_u, g = block.up.backward(du, _take(cache, "up"))
    _collect(grads, f"{prefix}.up", g)
    del du
    dh = dh + dh_u
    dn, g = block.mlp_norm.backward(dh, _take(cache, "mlp_norm"))
    _collect(grads, f"{prefix}.mlp_norm", g)
    return dx + dn  # the residual carries dx past the MLP


def lean_mlp_backward(
    block: Block,
    dx: Array,
    c_norm: Any,
    downs: list[Any] | None,
    grads: Grads,
    prefix: str,
    *,
    rng: np.random.Generator | None = None,
) -> Array:
    """A ``lean_mlp`` reversed, ``ROW_CHUNK`` tokens at a time: each chunk rebuilds h = mlp_norm(x),
    g and u from the norm's kept input (the forward's operations on the same rows), then runs down's,
    the SwiGLU's and the frozen gate's and up's backward. Only dx's (N, C) and a chunk's arrays exist
    at once; down's weight gradients are summed over the chunks.

    ``downs`` is down's cache of each chunk, kept by the forward, or None under activation
    checkpointing: then down's forward is rerun on the chunk for its cache (its output is not
    needed), drawing any dropout chunk after chunk as the forward did.

    Shapes:
        dx: (N, C)   returns: (N, C)
    """
    assert block.gate is not None
    x = c_norm.x  # (N, C) the norm's input
    dh = get_xp(dx).empty(x.shape, dtype=dx.dtype)
    local: Grads = {}
    for i, rows in enumerate(_row_chunks(x.shape[0], get_xp(x), block.gate.out_features)):
        h, _ = block.mlp_norm.forward(x[rows], keep=False)
        g, _ = block.gate.forward(h, keep=False)
        u, _ = block.up.forward(h, keep=False)
        del h
        if downs is None:
            m, _ = swiglu_forward(g, u)
            c_d = block.down.forward(m, keep=True, rng=rng)[1]
            del m
        else:
            c_d, downs[i] = downs[i], None
        dm, g_down = block.down.backward(dx[rows], c_d)
        del c_d
        for name, value in g_down.items():
            local[name] = local[name] + value if name in local else value
        dg, du = swiglu_backward(dm, SwiGLUCache(g, u))
        del dm, g, u
        dh[rows], _ = block.gate.backward(dg, None)
        dh[rows] += block.up.backward(du, None)[0]
        del dg, du
    _collect(grads, f"{prefix}.down", local)
    dn, g_norm = block.mlp_norm.backward(dh, c_norm)
    _collect(grads, f"{prefix}.mlp_norm", g_norm)
    return dx + dn  # the residual carries dx past the MLP


def attention_sublayer_backward(
    block: Block,
    dx: Array,
    cache: BlockCache,
    shape: tuple[int, int],
    rope: tuple[Array, Array] | None,
    config: ModelConfig,
    grads: Grads,
    prefix: str,
    *,
    need_dx: bool = True,
) -> Array | None:
    """The attention half reversed: dx (N, C) below it, the residual included, or None when
    ``need_dx`` is False and no norm below needs it. A cache without attention entries (see
    ``attention_backward_needed``) stops at O's weight gradient."""
    B, T = shape
    H, K, D = config.n_heads, config.n_kv_heads, config.head_dim
    c_att = _take(cache, "attn")
    # x = x + o(attention(rope(q(h)), rope(k(h)), v(h))),  h = attn_norm(x)
    dy = dx
    if block.post_attn_norm is not None:  # Gemma 3: x = x + post_attn_norm(o(…))
        dy, g = block.post_attn_norm.backward(dx, _take(cache, "post_attn_norm"))
        _collect(grads, f"{prefix}.post_attn_norm", g)
    da, g = block.o.backward(dy, _take(cache, "o"), need_dx=c_att is not None)
    del dy
    _collect(grads, f"{prefix}.o", g)
    if c_att is None:
        assert not need_dx, "the forward kept no attention cache, so no dx can be passed below"
        return None
    da = get_xp(da).ascontiguousarray(da.reshape(B, T, H, D).transpose(0, 2, 1, 3))  # (B, H, T, D)
    dq, dk, dv = attention_backward(da, c_att)
    del da, c_att
    if dk.shape[2] != T:
        raise ShapeError("the backward does not support a KV cache (training sees whole sequences)")
    if rope is not None:
        dq, dk = rope_backward(dq, *rope), rope_backward(dk, *rope)
    dq = dq.transpose(0, 2, 1, 3).reshape(B * T, H * D)  # (N, H·D)
    dk = dk.transpose(0, 2, 1, 3).reshape(B * T, K * D)  # (N, K·D)
    if block.q_norm is not None and block.k_norm is not None:
        dq, g = block.q_norm.backward(dq, _take(cache, "q_norm"))
        _collect(grads, f"{prefix}.q_norm", g)
        dk, g = block.k_norm.backward(dk, _take(cache, "k_norm"))
        _collect(grads, f"{prefix}.k_norm", g)
    dv = dv.transpose(0, 2, 1, 3).reshape(B * T, K * D)
    need_dh = need_dx or block.attn_norm.requires_grad
    dh = None
    ds = {"q": dq, "k": dk, "v": dv}
    del dq, dk, dv
    for name in ("q", "k", "v"):
        d_in, g = getattr(block, name).backward(ds.pop(name), _take(cache, name), need_dx=need_dh)
        _collect(grads, f"{prefix}.{name}", g)
        if need_dh and dh is None:
            dh = d_in
        elif need_dh:
            dh += d_in  # in place: each slot's dx is a fresh array
        del d_in
    c_norm = _take(cache, "attn_norm")
    if not need_dh:
        return None
    dn, g = block.attn_norm.backward(dh, c_norm)
    _collect(grads, f"{prefix}.attn_norm", g)
    return dx + dn


def block_backward(
    block: Block,
    dx: Array,
    cache: BlockCache,
    shape: tuple[int, int],
    rope: tuple[Array, Array] | None,
    config: ModelConfig,
    grads: Grads,
    prefix: str,
    *,
    need_dx: bool = True,
) -> Array | None:
    """The block's forward reversed: the MLP half, then the attention half. Adds its parameter
    gradients to ``grads``; returns dx (N, C), or None when ``need_dx`` is False and no norm below
    needs it (the lowest trainable block).

    Consumes ``cache``: each entry is dropped once used, so the MLP's caches are gone before the
    attention's backward runs."""
    dx = mlp_backward(block, dx, cache, config, grads, prefix)
    return attention_sublayer_backward(block, dx, cache, shape, rope, config, grads, prefix, need_dx=need_dx)


def checkpointed_block_backward(
    block: Block,
    dx: Array,
    saved: BlockCheckpoint,
    shape: tuple[int, int],
    rope: tuple[Array, Array] | None,
    allowed: Array,
    config: ModelConfig,
    grads: Grads,
    prefix: str,
    *,
    need_dx: bool = True,
) -> Array | None:
    """Activation checkpointing: rerun the block's forward from its kept input (same dropout draws),
    then its backward. Gradients are those of ``block_backward`` on a kept cache (to rounding: a
    ``lean_mlp`` sums down's gradient over row chunks); the cost is one more forward of the block,
    less for a ``lean_mlp``: its MLP is rerun inside its backward, chunk by chunk, without down's
    output, and its g and u serve both directions."""
    rng = _rng_from_state(saved.rng_state)
    if not lean_mlp(block):
        _, cache, _ = block_forward(block, saved.x, shape, rope, allowed, config, keep=True, rng=rng,
                                    keep_attention=attention_backward_needed(block, need_dx))
        assert cache is not None
        return block_backward(block, dx, cache, shape, rope, config, grads, prefix, need_dx=need_dx)
    x, cache, _ = attention_sublayer(block, saved.x, shape, rope, allowed, config, keep=True, rng=rng,
                                     keep_attention=attention_backward_needed(block, need_dx))
    assert cache is not None
    c_norm = block.mlp_norm.forward(x, keep=True)[1]  # its output h is rebuilt chunk by chunk
    del x
    dx = lean_mlp_backward(block, dx, c_norm, None, grads, prefix, rng=rng)
    del c_norm
    return attention_sublayer_backward(block, dx, cache, shape, rope, config, grads, prefix, need_dx=need_dx)


def model_backward(model: Model, dlogits: Array, cache: ModelCache, *, free_cache: bool = False) -> Grads:
    """Gradients of every trainable array, keyed as in ``trainable_parameters``.

    ``free_cache=True`` consumes ``cache``: each block's entries are dropped as its backward uses them,
    so memory falls during the backward (``loss_and_grads`` does this); otherwise the cache is left
    as it was and the backward can be run again on it.

    Shapes:
        dlogits: (B, T, V)
    """
    dx, grads = head_backward(model, dlogits, cache)
    return blocks_backward(model, dx, cache, grads, free_cache=free_cache)


def head_backward(model: Model, dlogits: Array, cache: ModelCache) -> tuple[Array, Grads]:
    """The LM head and the final norm reversed: (dx into the top block, their gradients).

    Shapes:
        dlogits: (B, T, V)   returns dx: (N, C)
    """
    B, T, V = dlogits.shape
    dlogits = dlogits.reshape(B * T, V)  # (N, V)
    grads: Grads = {}
    if model.lm_head is None:
        dx = linear_backward_input(dlogits, model.embed.weight)
        if model.embed.requires_grad:  # tied: E is used twice, the lookup's part is added below
            grads["embed.weight"] = linear_backward_weight(dlogits, cache.x_final)
    else:
        dx, g = model.lm_head.backward(dlogits, cache.head)
        _collect(grads, "lm_head", g)
    dx, g = model.final_norm.backward(dx, cache.final_norm)
    _collect(grads, "final_norm", g)
    return dx, grads


def blocks_backward(
    model: Model, dx: Array, cache: ModelCache, grads: Grads, *, free_cache: bool = False
) -> Grads:
    """The blocks (top down, to the lowest trainable one) and the embeddings reversed, from dx at the
    top of the residual stream; adds to and returns ``grads``. ``free_cache``: see ``model_backward``.

    Shapes:
        dx: (N, C)
    """
    c = model.config
    B, T = cache.tokens.shape
    need_embed = embeddings_trainable(model)
    for i in range(len(model.blocks) - 1, cache.lowest - 1, -1):  # top down, stopping at the lowest
        entry = cache.blocks[i]
        if free_cache:
            cache.blocks[i] = None  # freed once this block is done
        elif isinstance(entry, BlockCache):
            entry = copy.copy(entry)  # the backward empties the copy, the cache keeps its entries
        need_dx = i > cache.lowest or need_embed
        args = ((B, T), None if cache.rope is None else cache.rope[c.rope(i)])
        if isinstance(entry, BlockCheckpoint):
            assert cache.masks is not None
            dx = checkpointed_block_backward(model.blocks[i], dx, entry, *args, cache.masks[c.window(i)], c,
                                             grads, f"blocks.{i}", need_dx=need_dx)
        else:
            assert entry is not None
            dx = block_backward(model.blocks[i], dx, entry, *args, c, grads, f"blocks.{i}", need_dx=need_dx)
    if not need_embed:
        return grads
    assert dx is not None
    dx = dx.reshape(B, T, -1)
    scale = embed_scale(c, dx.dtype)  # x = E[ids]·√C
    for name, g in model.embed.backward(dx if scale is None else dx * scale, cache.tokens).items():
        key = f"embed.{name}"
        grads[key] = grads[key] + g if key in grads else g
    if model.pos_embed is not None:
        _collect(grads, "pos_embed", model.pos_embed.backward(dx, cache.positions))
    return grads


def loss_and_grads(
    model: Model,
    tokens: Array,
    targets: Array,
    *,
    attention_mask: Array | None = None,
    rng: np.random.Generator | None = None,
    loss_scale: float = 1.0,
    checkpoint: bool = False,
) -> tuple[float, Grads]:
    """Mean next-token cross-entropy over counted targets (−100 = ignored) and its gradients.

    ``targets[b, t]`` is the token that should follow position t (already shifted). ``loss_scale``
    multiplies the gradients (e.g. 1/k when accumulating k micro-batches); the loss is unscaled.
    ``checkpoint``: activation checkpointing (see ``model_forward``); the gradients do not change.

    Shapes:
        tokens, targets: (B, T) integer   attention_mask: (B, T)
    """
    if targets.shape != tokens.shape:
        raise ShapeError(f"targets {targets.shape} must have the shape of tokens {tokens.shape}")
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= model.config.vocab_size))
    if bool(bad.any()):  # the loss's lookup would fail, or wrap silently on CuPy
        raise DataError(f"targets must be token ids in [0, {model.config.vocab_size}) or {IGNORE_INDEX} "
                        f"(ignored), got {int(targets[bad][0])}")
    x, cache = model_forward(
        model, tokens, attention_mask=attention_mask, rng=rng, checkpoint=checkpoint, head=False
    )
    assert cache is not None
    backward = bool(trainable_parameters(model))
    loss, dx, grads = head_loss_and_backward(model, x.reshape(tokens.size, -1), targets.reshape(-1), cache,
                                             loss_scale=loss_scale, backward=backward, rng=rng)
    del x
    if dx is None:
        return loss, {}
    cache = cache._replace(x_final=None, final_norm=None)  # the head's inputs are no longer needed
    return loss, blocks_backward(model, dx, cache, grads, free_cache=True)


def head_loss_and_backward(
    model: Model,
    x: Array,
    targets: Array,
    cache: ModelCache,
    *,
    loss_scale: float = 1.0,
    backward: bool = True,
    rng: np.random.Generator | None = None,
) -> tuple[float, Array | None, Grads]:
    """The LM head, the cross-entropy and their backward, fused and ``ROW_CHUNK`` tokens at a time:
    (mean loss, dx into the top block, the head's and final norm's gradients). No (N, V) array
    exists, only a chunk's logits (turned into its probabilities in place) and its dlogits; the
    chunks' head gradients are summed. The loss and gradients are ``cross_entropy_forward``'s and
    ``head_backward``'s on all rows at once, to rounding.

    Shapes:
        x: (N, C) the final norm's output   targets: (N,) integer   returns dx: (N, C)
    """
    xp = get_xp(x)
    count = int((targets != IGNORE_INDEX).sum())
    total, grads = 0.0, {}
    dx = xp.empty(x.shape, dtype=x.dtype) if backward else None
    tied = model.lm_head is None
    for rows in _row_chunks(x.shape[0], xp, model.config.vocab_size):
        if tied:
            logits, c_head = linear_forward(x[rows], model.embed.weight), None  # tied: logits = x Eᵀ
        else:
            logits, c_head = model.lm_head.forward(x[rows], keep=backward, rng=rng)
        loss, ce = cross_entropy_forward(logits, targets[rows])
        del logits  # ce holds the probabilities, in the logits' buffer
        total += loss * ce.count
        if dx is None:
            continue
        dlogits = cross_entropy_backward(ce, loss_scale * ce.count / max(count, 1))  # / count, not / ce.count
        del ce
        if tied:
            dx[rows] = linear_backward_input(dlogits, model.embed.weight)
            trained = model.embed.requires_grad
            local = {"embed.weight": linear_backward_weight(dlogits, x[rows])} if trained else {}
        else:
            dx[rows], g = model.lm_head.backward(dlogits, c_head)
            local = {f"lm_head.{name}": value for name, value in g.items()}
        for key, value in local.items():  # tied: E's lookup part is added by ``blocks_backward``
            grads[key] = grads[key] + value if key in grads else value
    loss = total / max(count, 1)
    if dx is None:
        return loss, None, {}
    dx, g = model.final_norm.backward(dx, cache.final_norm)
    _collect(grads, "final_norm", g)
    return loss, dx, grads
