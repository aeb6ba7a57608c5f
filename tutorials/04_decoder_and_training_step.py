# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 04 · The whole decoder, one training step, and where the memory goes
#
# **What you will build.** A Llama-style decoder assembled from the layers of tutorials 01–03,
# its whole backward written by hand (SwiGLU with silu' derived, the head reshapes, the
# embedding's scatter-add) and matched array by array with `model_backward`, every gradient
# checked by finite differences, a few AdamW training steps, and a measurement of the memory a
# training step needs — and of how much of it disappears when the lower layers are frozen
# (partial backpropagation, the idea S2FT builds on).
#
# **Prerequisites.** Tutorials 01–03.
#
# **Library functions explained here.** `minift.ModelConfig`, `minift.init_model`,
# `minift.model_forward`, `minift.model_backward`, `minift.loss_and_grads`, `minift.set_trainable`,
# `minift.trainable_parameters`, `minift.model.Block`, `minift.model.ModelCache`,
# `minift.slots.Dense`, `minift.layers.embedding.embedding_backward`, `minift.optim.AdamW`,
# `minift.optim.Schedule`, `minift.optim.clip_grad_norm`, `minift.tools.measure.step_memory`.

# %%
import dataclasses
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from minift import (
    ModelConfig,
    init_model,
    loss_and_grads,
    model_backward,
    model_forward,
    set_trainable,
    trainable_parameters,
)
from minift.data import Batch
from minift.layers.attention import attention_backward, attention_forward, causal_mask
from minift.layers.cross_entropy import cross_entropy_backward, cross_entropy_forward
from minift.layers.embedding import embedding_backward
from minift.layers.linear import linear_backward_weight, linear_forward
from minift.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward
from minift.layers.rope import rope_backward, rope_forward, rope_tables
from minift.layers.swiglu import swiglu_backward, swiglu_forward
from minift.optim import AdamW, Schedule, clip_grad_norm
from minift.testing import assert_close, check_grad
from minift.tools.measure import step_memory


def show(fig, name: str) -> None:
    """Draw `fig` inline in a notebook; run as a script, save it as a PNG in the system's temporary
    folder instead (a tutorial never writes into the checkout) and say where."""
    if "ipykernel" in sys.modules:
        plt.show()
    else:
        path = Path(tempfile.gettempdir()) / f"minift-tutorial-{name}.png"
        fig.savefig(path)
        print(f"figure saved to {path}")
    plt.close(fig)


rng = np.random.default_rng(0)
config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, n_layers=2, n_heads=4,
                     n_kv_heads=2)
model = init_model(config, rng, dtype=np.float64, std=0.3)
print(config)

# %% [markdown]
# ## 1. What a model is
#
# A `Model` holds an embedding table E (V, C), a list of blocks, a final RMSNorm, and an LM head
# (V, C) — or none, when the head reuses E ("tied embeddings"). A `Block` holds two norms and
# seven **linear slots**: q, k, v, o for attention and gate, up, down for the SwiGLU MLP. A slot is
# anything that can run `y = f(x)` forward and give back `dx` and its own parameter gradients;
# `Dense` is the plain `y = x Wᵀ (+ b)`. The fine-tuning methods of later tutorials (LoRA, PiSSA,
# SORSA, S2FT) are other slot types swapped into the same places — the model code never changes.

# %%
block = model.blocks[0]
for name, slot in block.slots():
    print(f"  {name:>4}: {type(slot).__name__}  weight {slot.weight.shape}")

# %% [markdown]
# ## 2. The forward pass, composed by hand from the layers
#
# Each block updates the *residual stream* x (one C-vector per token) twice:
#
#     x = x + o(attention(rope(q(h)), rope(k(h)), v(h)))     h = attn_norm(x)
#     x = x + down(silu(gate(h)) ⊙ up(h))                    h = mlp_norm(x)
#
# and the logits are `lm_head(final_norm(x))`. The batch is B sequences of T tokens; the
# position-wise layers see them flattened to N = B·T rows, and attention sees them as heads,
# (B, H, T, D). Here it is, written with nothing but the layer functions of tutorials 01–03,
# compared with `model_forward`:

# %%
B, T = 2, 6
H, K, D = config.n_heads, config.n_kv_heads, config.head_dim
tokens = rng.integers(0, config.vocab_size, size=(B, T))


def decoder_by_hand(model, tokens):
    c = model.config
    x = model.embed.weight[tokens].reshape(B * T, -1)  # (N, C)
    cos, sin = rope_tables(np.broadcast_to(np.arange(T), (B, T)), D, c.rope_theta, c.rope_scaling)
    for blk in model.blocks:
        h, _ = rmsnorm_forward(x, blk.attn_norm.weight, c.norm_eps)
        q = linear_forward(h, blk.q.weight).reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = linear_forward(h, blk.k.weight).reshape(B, T, K, D).transpose(0, 2, 1, 3)  # (B, K, T, D)
        v = linear_forward(h, blk.v.weight).reshape(B, T, K, D).transpose(0, 2, 1, 3)
        a, _ = attention_forward(rope_forward(q, cos, sin), rope_forward(k, cos, sin), v, causal_mask(T, T))
        x = x + linear_forward(a.transpose(0, 2, 1, 3).reshape(B * T, H * D), blk.o.weight)
        h, _ = rmsnorm_forward(x, blk.mlp_norm.weight, c.norm_eps)
        m, _ = swiglu_forward(linear_forward(h, blk.gate.weight), linear_forward(h, blk.up.weight))
        x = x + linear_forward(m, blk.down.weight)
    x, _ = rmsnorm_forward(x, model.final_norm.weight, c.norm_eps)
    return linear_forward(x, model.lm_head.weight).reshape(B, T, -1)  # (B, T, V)


logits, _ = model_forward(model, tokens, train=False)
assert_close(logits, decoder_by_hand(model, tokens), rtol=1e-12, atol=1e-13, what="logits")
print("logits", logits.shape, "match the hand-composed decoder")

# %% [markdown]
# ## 3. The loss and the backward pass
#
# A language model predicts the *next* token: the target at position t is the token at t + 1.
# `loss_and_grads(model, tokens, targets)` expects the targets already shifted, with −100 where
# nothing should be learned (here, the last position, which has no next token).
#
# The backward is the forward reversed (`model_backward`): LM head, final norm, then each block
# from the top — MLP first, then attention — with the residual stream carrying `dx` past each
# branch (`dx = dx + d(branch)`), exactly the rule "a value used twice gets both gradients".

# %%
inputs = tokens
targets = np.concatenate([tokens[:, 1:], np.full((B, 1), -100)], axis=1)  # (B, T), shifted
set_trainable(model)  # full fine-tuning: every array trainable
params = trainable_parameters(model)
print(len(params), "trainable arrays, e.g.", list(params)[:4])

loss, grads = loss_and_grads(model, inputs, targets)
assert grads.keys() == params.keys()

# the same thing by hand: forward with a cache, cross-entropy, backward
logits, cache = model_forward(model, inputs)
ce_loss, ce_cache = cross_entropy_forward(logits.reshape(B * T, -1), targets.reshape(-1))
grads_by_hand = model_backward(model, cross_entropy_backward(ce_cache).reshape(logits.shape), cache)
assert ce_loss == loss
for key in grads:
    assert np.array_equal(grads[key], grads_by_hand[key])

# %% [markdown]
# ### The backward, written by hand
#
# `model_backward` is nothing but the layer backwards of tutorials 01–03, run in reverse order.
# The attention half of a block, forward left to right; the backward runs right to left, and where
# an arrow forks in the forward, the gradients arriving along its branches add:
#
#     x ──┬─────────────────────────────────────────────────────────────────────────(+)──► x
#         │                                                                          ▲
#         └─► attn_norm ─► h ─┬─► q ─► heads ─► rope ─┐                              │
#                             ├─► k ─► heads ─► rope ─┼─► attention ─► unheads ─► o ─┘
#                             └─► v ─► heads ─────────┘
#
#     backward:  dh = (dq from q) + (dk from k) + (dv from v)     dx = dx + d(branch)
#
# (`heads` and `unheads` are the reshapes between (N, H·D) and (B, H, T, D), below.) The MLP half
# has the same shape, with gate and up in place of q, k, v and SwiGLU in place of attention.
# Three pieces are new here; derive them first.
#
# **SwiGLU.** The MLP computes `m = silu(g) ⊙ u` with g = gate(h), u = up(h), and
# `silu(z) = z · σ(z)`, σ the logistic sigmoid `σ(z) = 1 / (1 + e^−z)`. Its derivative is
# `σ'(z) = e^−z / (1 + e^−z)² = σ(z) (1 − σ(z))`, so by the product rule
# `silu'(z) = σ(z) + z σ(z)(1 − σ(z)) = σ(z) (1 + z (1 − σ(z)))`, and the product `m = silu(g) ⊙ u`
# gives `dg = dm ⊙ u ⊙ silu'(g)` and `du = dm ⊙ silu(g)`.
#
# **Head reshapes.** A projection's output (N, H·D) becomes heads by a reshape and a transpose,
# (N, H·D) → (B, T, H, D) → (B, H, T, D). Both only move entries, so the backward moves the
# gradient back the same way: the inverse transpose, then the inverse reshape.
#
# **Embedding.** The lookup `x[n] = E[token_n]` copies row token_n of E (V, C) into position n.
# So row t of E reaches every position n that holds token t, and nothing else: E's row t receives
# the sum of `dx[n]` over those positions — a *scatter-add* — and zero when t does not occur.
# A token that occurs twice is a value used twice.
#
# And tutorial 01's rule, everywhere: **a value used twice gets both gradients.** h feeds q, k and
# v (and gate and up): its gradient is the sum of what each projection sends back. The residual
# stream x feeds the branch and skips past it: `dx = dx + d(branch)`.

# %%
def silu(z):
    return z / (1 + np.exp(-z))  # z · σ(z)


def silu_grad(z):
    s = 1 / (1 + np.exp(-z))
    return s * (1 + z * (1 - s))


def swiglu_by_hand_backward(dm, g, u):
    return dm * u * silu_grad(g), dm * silu(g)  # (dg, du)


def heads(y, n):
    """(N, n·D) → (B, n, T, D)."""
    return y.reshape(B, T, n, D).transpose(0, 2, 1, 3)


def unheads(y):
    """(B, n, T, D) → (N, n·D): the inverse of `heads`, so also the backward of `heads`."""
    return y.transpose(0, 2, 1, 3).reshape(B * T, -1)


z = np.linspace(-4, 4, 9)
check_grad(silu, lambda G, z: {"z": G * silu_grad(z)}, {"z": z.copy()})
g_, u_, dm_ = (rng.standard_normal((5, 7)) for _ in range(3))
assert_close(swiglu_forward(g_, u_)[0], silu(g_) * u_, rtol=1e-13, what="swiglu forward")
for mine, lib in zip(swiglu_by_hand_backward(dm_, g_, u_), swiglu_backward(dm_, swiglu_forward(g_, u_)[1]),
                     strict=True):
    assert_close(mine, lib, rtol=1e-12, atol=1e-14, what="swiglu backward")
print("silu' by finite differences, and the SwiGLU backward against the library's: checked")


# %%
def backward_by_hand(model, tokens, dlogits):
    """Every parameter's gradient, and the gradient dx (N, C) that arrives at the looked-up embedding
    rows: the forward of `decoder_by_hand` keeping what each backward needs, then the backward, block
    by block from the top."""
    c = model.config
    cos, sin = rope_tables(np.broadcast_to(np.arange(T), (B, T)), D, c.rope_theta, c.rope_scaling)
    x = model.embed.weight[tokens].reshape(B * T, -1)
    kept = []
    for blk in model.blocks:
        h1, n1 = rmsnorm_forward(x, blk.attn_norm.weight, c.norm_eps)
        q, k, v = (heads(linear_forward(h1, s.weight), n) for s, n in ((blk.q, H), (blk.k, K), (blk.v, K)))
        a, att = attention_forward(rope_forward(q, cos, sin), rope_forward(k, cos, sin), v, causal_mask(T, T))
        x = x + linear_forward(unheads(a), blk.o.weight)
        h2, n2 = rmsnorm_forward(x, blk.mlp_norm.weight, c.norm_eps)
        g, u = linear_forward(h2, blk.gate.weight), linear_forward(h2, blk.up.weight)
        kept.append((h1, n1, att, unheads(a), h2, n2, g, u, silu(g) * u))
        x = x + linear_forward(silu(g) * u, blk.down.weight)
    xf, nf = rmsnorm_forward(x, model.final_norm.weight, c.norm_eps)

    grads = {}
    dy = dlogits.reshape(B * T, -1)
    grads["lm_head.weight"] = dy.T @ xf  # y = x Wᵀ: dW = dyᵀ x, dx = dy W (tutorial 01)
    dx, grads["final_norm.weight"] = rmsnorm_backward(dy @ model.lm_head.weight, nf, model.final_norm.weight)
    for i in reversed(range(len(model.blocks))):
        blk, (h1, n1, att, a, h2, n2, g, u, m), p = model.blocks[i], kept[i], f"blocks.{i}."
        # the MLP branch: x = x + down(silu(gate(h2)) ⊙ up(h2)), h2 = mlp_norm(x)
        grads[p + "down.weight"] = dx.T @ m
        dg, du = swiglu_by_hand_backward(dx @ blk.down.weight, g, u)
        grads[p + "gate.weight"], grads[p + "up.weight"] = dg.T @ h2, du.T @ h2
        dh2 = dg @ blk.gate.weight + du @ blk.up.weight  # h2 feeds gate and up: the two add
        d_branch, grads[p + "mlp_norm.weight"] = rmsnorm_backward(dh2, n2, blk.mlp_norm.weight)
        dx = dx + d_branch  # the residual: the skip and the branch
        # the attention branch: x = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = attn_norm(x)
        grads[p + "o.weight"] = dx.T @ a
        dq, dk, dv = attention_backward(heads(dx @ blk.o.weight, H), att)  # tutorial 03
        dq, dk, dv = unheads(rope_backward(dq, cos, sin)), unheads(rope_backward(dk, cos, sin)), unheads(dv)
        grads[p + "q.weight"], grads[p + "k.weight"], grads[p + "v.weight"] = dq.T @ h1, dk.T @ h1, dv.T @ h1
        dh1 = dq @ blk.q.weight + dk @ blk.k.weight + dv @ blk.v.weight  # h1 feeds q, k and v
        d_branch, grads[p + "attn_norm.weight"] = rmsnorm_backward(dh1, n1, blk.attn_norm.weight)
        dx = dx + d_branch
    # the library's scatter-add; you write it yourself below
    grads["embed.weight"] = embedding_backward(dx, tokens.reshape(-1), c.vocab_size)
    return grads, dx


mine, d_embedded = backward_by_hand(model, inputs, cross_entropy_backward(ce_cache).reshape(logits.shape))
assert mine.keys() == grads.keys()
for key in grads:
    assert_close(mine[key], grads[key], rtol=1e-10, atol=1e-13, what=key)
print(f"all {len(grads)} gradients written by hand match model_backward's")

# %% [markdown]
# **Your turn: the embedding's backward.** `backward_by_hand` called the library's
# `embedding_backward` for the last step. Write it yourself in the cell below: given the gradient
# `dx` (N, C) arriving at the looked-up rows (`d_embedded`, returned by `backward_by_hand`), the
# token ids (N,) and the vocabulary size V, return `dE` (V, C). The check runs it on six
# positions where tokens repeat and compares it with the library's `embedding_backward`; the cell
# after it shows, on this tutorial's batch, what a tempting one-liner gets wrong.

# %%
def embedding_backward_by_hand(dx, tokens, V):
    """dE (V, C) for x = E[tokens]: row t is the sum of dx[n] over the positions n with tokens[n] == t."""
    return None  # your code here


def check_embedding_backward_by_hand(embedding_backward_by_hand):
    ids = np.array([3, 1, 3, 0, 3, 1])  # token 3 three times, 1 twice, 2 and 4 never
    dx_ = np.random.default_rng(11).standard_normal((6, 4))
    dE = embedding_backward_by_hand(dx_, ids, 5)
    if dE is None:
        print("your turn (embedding backward): not answered yet")
        return
    assert_close(dE, embedding_backward(dx_, ids, 5), rtol=1e-12, atol=1e-15, what="dE vs embedding_backward")
    print("your turn (embedding backward): correct")


check_embedding_backward_by_hand(embedding_backward_by_hand)

# %% [markdown]
# The tempting one-liner `dE[tokens] += dx` is wrong exactly when a token repeats: NumPy evaluates
# the fancy-indexed `+=` as `dE[tokens] = dE[tokens] + dx`, a gather, an add and a scatter, so
# for a token that occurs twice the second write replaces the first instead of adding to it.
# `np.add.at(dE, tokens, dx)` adds once per occurrence (so does `dE = onehot(tokens)ᵀ dx`, at the
# cost of an (N, V) matrix).

# %%
flat = inputs.reshape(-1)
repeated = int(np.bincount(flat).argmax())
overwritten = np.zeros_like(model.embed.weight)
overwritten[flat] += d_embedded
scattered = np.zeros_like(model.embed.weight)
np.add.at(scattered, flat, d_embedded)
print(f"token {repeated} occurs {np.bincount(flat)[repeated]} times; row {repeated} of dE: "
      f"max |add.at − fancy +=| = {np.abs(scattered[repeated] - overwritten[repeated]).max():.3f}")
assert_close(scattered, grads["embed.weight"], rtol=1e-10, atol=1e-14, what="np.add.at")
assert not np.allclose(overwritten, grads["embed.weight"])


# %% [markdown]
# ### The whole model's gradient, checked by finite differences
#
# `check_grad` perturbs each entry of the arrays it is given *in place*, by ±ε, and compares the
# resulting central differences of the loss with the gradient the backward returned: one relative
# error ‖g − g_fd‖ / max(‖g‖, ‖g_fd‖) per array (the `rel error` column; `max |Δ|` is the largest
# entrywise difference, `‖grad‖` the norm of the finite-difference gradient), which must stay
# below 1e-6. Passing the model's own arrays (not copies) therefore perturbs the model, and the
# forward can ignore its arguments.
#
# Which arrays to check? A gradient rule that is wrong in one place only shows up in the arrays
# whose gradient flows *through* that place — a doubled gradient of the gate weight, say, leaves
# every other array's gradient untouched. So we check all 21 arrays (4,944 numbers, two forwards
# each: about ten seconds in float64).

# %%
checked = params  # every trainable array of the model


def loss_only(model):
    """The loss without the backward (train=False keeps no cache): cheap for finite differences."""
    logits, _ = model_forward(model, inputs, train=False)
    return cross_entropy_forward(logits.reshape(B * T, -1), targets.reshape(-1))[0]


def whole_model_loss(**_):
    return loss_only(model)


def whole_model_grads(G, **_):
    _, g = loss_and_grads(model, inputs, targets)
    return {k: G * g[k] for k in checked}


report = check_grad(whole_model_loss, whole_model_grads, checked)
print(report)
assert len(report.checks) == len(params) == 21

# %% [markdown]
# And the slip the check is for: a backward whose gate-weight gradient in block 0 came out doubled
# (say, its `dgᵀ h` added into a buffer twice). Checked on four other arrays it would pass; only
# the gate weight's own row fails:

# %%
def doubled_gate_grads(G, **_):
    g = whole_model_grads(G)
    return {**g, "blocks.0.gate.weight": 2 * g["blocks.0.gate.weight"]}


few = ["blocks.0.attn_norm.weight", "blocks.1.v.weight", "blocks.1.mlp_norm.weight", "final_norm.weight"]
bad = check_grad(whole_model_loss, doubled_gate_grads, {k: params[k] for k in [*few, "blocks.0.gate.weight"]},
                 raise_on_failure=False)
print(bad)
assert [c.name for c in bad.checks if c.rel_error > bad.tol] == ["blocks.0.gate.weight"]

# %% [markdown]
# ### Why backward functions return gradients instead of accumulating them
#
# Many hand-written backprop codes add (`+=`) into gradient buffers owned by the parameters, which
# must then be zeroed before every step; forget once, and the gradient silently doubles. minift's
# backward functions return fresh arrays, and where a tensor is used twice the composite sums the
# two parts explicitly. So computing the gradient twice gives the same answer — a property, not a
# convention you have to remember:

# %%
_, again = loss_and_grads(model, inputs, targets)
assert all(np.array_equal(again[k], grads[k]) for k in grads)

# %% [markdown]
# The clearest "used twice" case is a tied LM head: E is read by the embedding lookup at the
# bottom and by the head `logits = x Eᵀ` at the top. Its gradient is the sum of both parts:

# %%
tied = set_trainable(init_model(config.replace(tie_word_embeddings=True), rng, dtype=np.float64, std=0.3))
E = tied.embed.weight
check_grad(lambda E: loss_only(tied),
           lambda G, E: {"E": G * loss_and_grads(tied, inputs, targets)[1]["embed.weight"]}, {"E": E})
print("tied embedding gradient = head part + lookup part: checked")

# %% [markdown]
# and the head part alone — what a backward that overwrote instead of summing would keep — fails
# the same check:

# %%
logits, cache = model_forward(tied, inputs)
_, ce = cross_entropy_forward(logits.reshape(B * T, -1), targets.reshape(-1))
head_only = linear_backward_weight(cross_entropy_backward(ce), cache.x_final)  # dlogitsᵀ x_final
bad = check_grad(lambda E: loss_only(tied), lambda G, E: {"E": G * head_only}, {"E": E},
                 raise_on_failure=False)
print(bad)
assert not bad.ok

# %% [markdown]
# ## 4. A training step
#
# One step is: loss and gradients → clip the global gradient norm → AdamW update, in place, at the
# learning rate the schedule gives for this step. `AdamW` keeps two moment arrays per trainable
# array and nothing for frozen ones, so its state is exactly as large as what you train.
#
# The task: memorise one short sequence. (Tutorial 11 trains on real data with the full loop.)

# %%
model = set_trainable(init_model(config, np.random.default_rng(1), dtype=np.float32))
params = trainable_parameters(model)
opt = AdamW(params, weight_decay=0.0)
schedule = Schedule(lr_max=3e-2, total_steps=40, kind="cosine", warmup_steps=4)
seq = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
x_in, y_out = seq[:, :-1], seq[:, 1:]
losses = []
for step in range(schedule.total_steps):
    loss, grads = loss_and_grads(model, x_in, y_out)
    clip_grad_norm(grads, max_norm=1.0)  # rescales grads in place; returns the norm before
    opt.step(grads, lr=schedule(step))
    losses.append(loss)
print(f"loss {losses[0]:.3f} → {losses[-1]:.3f}; optimizer state {opt.state_bytes()} bytes")
assert losses[-1] < 0.2 * losses[0]
assert params["blocks.0.q.weight"] is model.blocks[0].q.weight  # updated in place, not replaced

# %% [markdown]
# ## 5. Where the memory goes
#
# A training step needs, besides the weights: the **cache** the forward keeps for the backward
# (activations), the **gradients**, and the **optimizer state**. Python's `tracemalloc` sees every
# NumPy allocation, so the peak of a step is a measured, reproducible number:
# `minift.tools.measure.step_memory` runs one full step (forward, backward, clipping, AdamW) under it
# and reports the weights, the optimizer state, and the step's peak *above* both.
#
# First, look inside the cache. It is a tree of NamedTuples and (mutable, so that the backward can
# drop each entry once used) dataclasses; the same array can appear in several places (q, k and v
# all keep the *same* normalised input h), so count each array once.

# %%
def arrays_in(obj, seen=None):
    """Every distinct ndarray inside nested tuples/lists/dataclasses, counted once by identity."""
    seen = {} if seen is None else seen
    if isinstance(obj, np.ndarray):
        seen[id(obj)] = obj
    elif dataclasses.is_dataclass(obj):
        arrays_in(list(vars(obj).values()), seen)
    elif isinstance(obj, tuple | list):
        for item in obj:
            arrays_in(item, seen)
    return seen


big = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=160, n_layers=4, n_heads=4,
                  n_kv_heads=2)
Bm, Tm = 4, 64
tok = np.random.default_rng(2).integers(0, big.vocab_size, size=(Bm, Tm + 1))
xb, yb = tok[:, :-1], tok[:, 1:]


def cache_bytes(model):
    _, cache = model_forward(model, xb)
    return sum(a.nbytes for a in arrays_in(cache).values())


full = set_trainable(init_model(big, np.random.default_rng(3)))
top_only = init_model(big, np.random.default_rng(3))  # frozen everywhere …
top_only.blocks[-1].down.requires_grad = True  # … except the top block's down projection

_, full_cache = model_forward(full, xb)
_, top_cache = model_forward(top_only, xb)
print("blocks with a cache, full FT :", [c is not None for c in full_cache.blocks])
print("blocks with a cache, top only:", [c is not None for c in top_cache.blocks])

batch = Batch(xb, yb, np.ones_like(xb))
models = {"full fine-tuning": full, "top block's down only": top_only}
reports = {name: step_memory(m, [batch]) for name, m in models.items()}  # lr = 0: weights unchanged
rows = {name: (cache_bytes(m), reports[name].step_peak_bytes) for name, m in models.items()}
print(f"weights: {reports['full fine-tuning'].weights_bytes / 2**20:.2f} MiB (float32)")
for name, (cb, peak) in rows.items():
    print(f"{name:>22}: forward cache {cb / 2**20:5.2f} MiB, step peak {peak / 2**20:5.2f} MiB, "
          f"AdamW state {reports[name].optimizer_bytes / 2**20:5.2f} MiB")
assert rows["top block's down only"][1] < 0.6 * rows["full fine-tuning"][1]
assert rows["top block's down only"][0] < 0.5 * rows["full fine-tuning"][0]

# %% [markdown]
# With only the top block trainable, the three lower blocks run in inference mode and keep
# nothing (`ModelCache.blocks` holds None for them), the backward stops after the top block, and
# frozen slots compute `dx` only. That is **partial backpropagation**; S2FT (tutorials 08–10)
# keeps trainable blocks in *every* layer and still saves most of this, by keeping only the
# activation columns its few trainable columns need.
#
# As a picture:

# %%
fig, ax = plt.subplots(figsize=(5, 3))
names = list(rows)
ax.bar(names, [rows[n][1] / 2**20 for n in names], label="step peak")
ax.bar(names, [rows[n][0] / 2**20 for n in names], label="forward cache")
ax.set_ylabel("MiB")
ax.legend()
fig.tight_layout()
show(fig, "04_memory")

# %% [markdown]
# ## Summary
#
# * The decoder is the layers composed; the backward is that composition reversed, with the
#   residual stream summing gradients, a head reshape undone by its inverse, and the embedding
#   scatter-adding into the rows of the tokens it looked up.
# * Backward functions return fresh gradients, so a gradient computation is idempotent and tied
#   weights sum their parts explicitly.
# * A training step = `loss_and_grads` → `clip_grad_norm` → `AdamW.step(grads, lr=schedule(step))`.
# * Memory = weights + forward cache + gradients + optimizer state; freezing the bottom of the
#   network removes its cache and its backward.
#
# ## Exercises
#
# 1. **Gradient accumulation.** Split a batch of 4 sequences into two micro-batches of 2 and show
#    that `minift.train.accumulate_gradients` gives the gradient of the whole batch. Then pad one
#    micro-batch's targets with −100 and explain why a plain average of the two gradients is wrong;
#    write the right combination.
# 2. **What the cache holds.** For the `big` config above, list the five largest arrays in a full
#    fine-tuning cache, with their shapes and which layer keeps them. (Walk the whole tree —
#    NamedTuples, dataclasses, lists — and count an array kept in two places once.)
# 3. **Memory against sequence length.** Measure the full-FT step peak for T = 16, 32, 64, 128,
#    fit `peak ≈ a + b·T + c·T²` by least squares, and say which part of a step is quadratic in T.
#
# Solutions: `tutorials/solutions/04_decoder_and_training_step.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: a check
# prints "not answered yet" while its function returns None, "correct" when your answer is right,
# and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def combine_micro_batches(grads, counted):
    """Exercise 1: the whole batch's gradient from micro-batch gradients `grads` (a list of dicts,
    each the mean over its own counted target tokens) and their counts of counted tokens."""
    return None  # your code here


def check_combine_micro_batches(combine_micro_batches):
    m = set_trainable(init_model(config, np.random.default_rng(5), dtype=np.float64, std=0.3))
    r = np.random.default_rng(6)
    tok, tgt = r.integers(0, config.vocab_size, (4, 7)), r.integers(0, config.vocab_size, (4, 7))
    tgt[2:, :5] = -100  # the second micro-batch counts far fewer tokens
    parts = [loss_and_grads(m, tok[i:i + 2], tgt[i:i + 2])[1] for i in (0, 2)]
    counts = [int((tgt[i:i + 2] != -100).sum()) for i in (0, 2)]
    combined = combine_micro_batches(parts, counts)
    if combined is None:
        print("exercise 1: not answered yet")
        return
    whole = loss_and_grads(m, tok, tgt)[1]
    for k in whole:
        assert_close(combined[k], whole[k], rtol=1e-10, atol=1e-14, what=k)
    print("exercise 1: correct")


check_combine_micro_batches(combine_micro_batches)


# %%
def five_largest(cache):
    """Exercise 2: the five largest distinct arrays (by bytes) in a model cache, largest first, as a
    list of (where, array) pairs; `where` is any label that says where the array sits."""
    return None  # your code here


def check_five_largest(five_largest):
    m = set_trainable(init_model(big, np.random.default_rng(3)))
    _, cache = model_forward(m, xb)
    found = five_largest(cache)
    if found is None:
        print("exercise 2: not answered yet")
        return
    found = [a for _, a in found]
    inside = {id(a) for a in arrays_in(cache).values()}
    assert len(found) == 5, f"{len(found)} arrays, expected five"
    assert len({id(a) for a in found}) == 5, "the same array twice: count each array once"
    assert all(id(a) in inside for a in found), "every array must be one the cache holds"
    expected = sorted((a.nbytes for a in arrays_in(cache).values()), reverse=True)[:5]
    assert [a.nbytes for a in found] == expected, (
        f"sizes {[a.nbytes for a in found]}, expected {expected}: did the walk reach the blocks' caches?")
    print("exercise 2: correct")


check_five_largest(five_largest)


# %%
def fit_growth(Ts, peaks):
    """Exercise 3: the least-squares coefficients (a, b, c) of peak ≈ a + b·T + c·T²."""
    return None  # your code here


def check_fit_growth(fit_growth):
    Ts = np.array([16.0, 32.0, 64.0, 128.0])
    if fit_growth(Ts, 1.0 + Ts) is None:
        print("exercise 3: not answered yet")
        return
    for a, b, c in [(5e5, 3e3, 20.0), (1e6, 0.0, 0.0), (0.0, 1.0, 1.0)]:
        found = np.asarray(fit_growth(Ts, a + b * Ts + c * Ts**2), dtype=float)
        assert np.allclose(found, [a, b, c], rtol=1e-6, atol=1e-6), f"got {found}, expected {(a, b, c)}"
    print("exercise 3: correct")


check_fit_growth(fit_growth)
