# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 12 · Checking your own implementation against the minift spec
#
# **What you will build.** A second, independent implementation of the methods — LoRA, PiSSA,
# SORSA, and S2FT with its co-permutation, its decoder and its partial backward — written from
# NumPy alone straight from the formulas, the kind you would write in another framework, and the
# check that it is right: the minift *spec*, a set of Hypothesis properties that state the
# methods' mathematics ("merging does not change the output", "the regularizer is zero exactly for
# orthonormal factors", "block gradients equal the full gradient restricted to the block") over a
# small documented interface. You will run them against your port, watch them catch two plausible
# mistakes (a squared regularizer, a co-permutation that forgets O) with a shrunk counterexample,
# meet a shortcut no check of outputs can see (a partial backward that computes the full gradient
# and slices it) and catch it by counting work, and check the port against the exported test
# vectors, which need no Python at all.
#
# **Prerequisites.** Tutorials 01–04 (the decoder's backward), 06–07 (LoRA, PiSSA, SORSA) and
# 08–09 (S2FT's selection, co-permutation and partial backward).
#
# **Library functions explained here.** `minift.spec.interface.Implementation`,
# `minift.spec.properties.PROPERTIES`, `minift.spec.reference` (the oracle), `minift.spec.export.outputs_of`,
# `minift.spec.export.export_vectors`, and `minift.io.safetensors_io.read_safetensors` (to read the
# vectors).

# %%
import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# The spec's properties run Hypothesis, which by default keeps its files (a database of failing
# examples, a cache) in ./.hypothesis; a tutorial writes nothing into the folder it runs from, so
# they go to a temporary folder, and no database is kept. (Before minift.spec.properties is
# imported: the properties read the profile then.)
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="minift-tutorial-hypothesis-"))
settings.register_profile("minift-tutorial", parent=settings.default, database=None)
settings.load_profile("minift-tutorial")

from minift.io.safetensors_io import read_safetensors
from minift.spec.export import export_vectors, outputs_of
from minift.spec.properties import PROPERTIES

# Every file this tutorial writes goes into a scratch folder that is deleted when Python exits:
# the tutorial can be rerun, from any folder, and leaves the checkout as it found it.
work = Path(tempfile.mkdtemp(prefix="minift-tutorial-"))
atexit.register(shutil.rmtree, work, ignore_errors=True)

# %% [markdown]
# ## 1. The interface
#
# `minift.spec.interface.Implementation` lists the operations the properties are written against. Every
# argument is a float64 NumPy array; model weights use Hugging Face Llama names
# (`model.layers.0.self_attn.o_proj.weight`) in the `[out, in]` layout, so an implementation in
# PyTorch, JAX or C only needs a thin adapter. The properties, by name:

# %%
for name in PROPERTIES:
    print(" ", name)

# %% [markdown]
# ## 2. A second implementation, from the formulas
#
# Here is the low-rank part, written without minift: each method exactly as its paper states it.
# Sections 5 and 6 add S2FT (the co-permutation, then the decoder and the partial backward), also
# from NumPy alone.

# %%
class MyLowRank:
    name = "my-low-rank"

    def lora_forward(self, x, W, A, B, scaling):
        return x @ W.T + scaling * (x @ A.T) @ B.T

    def lora_merge(self, W, A, B, scaling):
        return W + scaling * B @ A

    def lora_unmerge(self, W, A, B, scaling):
        return W - scaling * B @ A

    def pissa_init(self, W, r, alpha):
        s = alpha / r
        U, sigma, Vt = np.linalg.svd(W, full_matrices=False)
        root = np.sqrt(sigma[:r] / s)
        A, B = root[:, None] * Vt[:r], U[:, :r] * root
        return W - s * B @ A, A, B

    def sorsa_split(self, W, r):
        U, sigma, Vt = np.linalg.svd(W, full_matrices=False)
        B, S, A = U[:, :r], sigma[:r], Vt[:r]
        return W - (B * S) @ A, B, S, A

    def sorsa_forward(self, x, W_res, B, S, A):
        return x @ W_res.T + ((x @ A.T) * S) @ B.T

    def sorsa_merge(self, W_res, B, S, A):
        return W_res + (B * S) @ A

    def sorsa_regularizer(self, factors):
        terms, grads = [], []
        for A, B in factors:
            M, N = A @ A.T - np.eye(len(A)), B.T @ B - np.eye(B.shape[1])
            nm, nn = np.linalg.norm(M), np.linalg.norm(N)
            terms += [nm, nn]
            grads.append((2 * M @ A / nm if nm else 0 * A, 2 * B @ N / nn if nn else 0 * B))
        k = 2 * len(factors)
        return float(sum(terms) / k), [(gA / k, gB / k) for gA, gB in grads]


mine = MyLowRank()

# %% [markdown]
# ## 3. Run the properties against it
#
# Each property is a Hypothesis test `prop(impl)`: Hypothesis draws the shapes, seeds and scalings
# (each property also has one hand-picked `@example`), and a failure raises with the *shrunk*
# counterexample — the smallest input it could find that breaks the claim. The number of examples
# comes from the Hypothesis profile active when `minift.spec.properties` is first imported (100
# by default; load a profile before that import to change it). On the command line the same
# suite is
#
#     pytest --pyargs minift.spec --impl mypackage.adapter
#
# where `mypackage.adapter` exposes an `implementation` object.

# %%
low_rank = [n for n in PROPERTIES if n.startswith(("lora", "pissa", "sorsa"))]
for name in low_rank:
    PROPERTIES[name](mine)
    print("passed:", name)

# %% [markdown]
# ## 4. A plausible mistake, caught
#
# The SORSA paper writes its regularizer with Frobenius norms; squaring them is a natural slip (the
# squared norm is smoother and is what many regularizers use). The value and the gradient then
# change — and the spec says so, naming the input that broke it. Here the property's own
# hand-picked `@example` already fails; when only a generated input fails, Hypothesis first
# shrinks it to a minimal one.

# %%
class SquaredNorms(MyLowRank):
    def sorsa_regularizer(self, factors):
        terms, grads = [], []
        for A, B in factors:
            M, N = A @ A.T - np.eye(len(A)), B.T @ B - np.eye(B.shape[1])
            terms += [np.sum(M * M), np.sum(N * N)]
            grads.append((4 * M @ A, 4 * B @ N))
        k = 2 * len(factors)
        return float(sum(terms) / k), [(gA / k, gB / k) for gA, gB in grads]


try:
    PROPERTIES["sorsa_regularizer_is_the_mean_of_unsquared_frobenius_norms"](SquaredNorms())
    report = ""
except AssertionError as e:  # Hypothesis attaches the shrunk input as a note on the exception
    report = "\n".join([str(e), *getattr(e, "__notes__", [])])
print(report)
assert "regularizer" in report

# %% [markdown]
# Note what does *not* catch it: the squared version is also zero exactly for orthonormal
# factors, and a finite-difference check of its gradient against its *own* value would pass too.
# Only properties that state the definition — the value, and the gradient of the defined value —
# tell the two apart, which is why the spec states definitions and not just invariants.

# %%
PROPERTIES["sorsa_regularizer_is_zero_exactly_for_orthonormal_factors"](SquaredNorms())
print("the squared regularizer passes the zero-at-orthonormal property: invariants alone are not enough")

# %% [markdown]
# ## 5. S2FT's co-permutation, from NumPy alone
#
# The spec speaks the format of checkpoints: weights are a dict of Hugging Face Llama keys
# (`model.layers.0.self_attn.o_proj.weight`, …) in PyTorch's `[out, in]` layout, and a
# **selection** is a dict `{layer index: [ids]}` — one for the query heads (0 … H−1) and one for
# the FFN channels (0 … F−1), both numbered as in the unmodified checkpoint. Those numbers are the
# **original coordinates**: `copermute` reorders the rows and columns of a layer's matrices so
# that the selected channels sit at the front and the selected heads in as few contiguous runs as
# grouped-query attention allows (one, unless more than two groups are partly selected), and
# `unpermute` puts every number back where the checkpoint had it.
#
# What must move together (tutorial 08): query head h is rows h·D … (h+1)·D−1 of Q and the same
# *columns* of O; key/value head g is the same rows of K and V, and serves the G = H/K query heads
# g·G … (g+1)·G−1, so under grouped-query attention whole groups move and the query heads stay
# with their group; FFN channel j is row j of Gate and Up and column j of Down. Here is a port
# that does exactly that. (The properties that check it run the decoder, which the port gets in
# section 6.)

# %%
def head_rows(order, D):
    """Row (or column) indices of the heads in `order`, each a block of D."""
    return np.concatenate([np.arange(h * D, (h + 1) * D) for h in order])


def layer_orders(config, heads, channels):
    """The new order of the KV groups, of the query heads and of the FFN channels of one layer, in
    the spec's documented minimal layout: groups partial₀, full…, partial₁, partial₂, …, empty…, the
    selected heads last inside partial₀, partial₂, … and first inside the others, so that they form
    ⌈p/2⌉ runs for p partially selected groups; the selected channels first."""
    H, K, F = config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    G = H // K
    chosen = set(heads)
    members = {g: list(range(g * G, (g + 1) * G)) for g in range(K)}
    picked = {g: [h for h in members[g] if h in chosen] for g in range(K)}
    partial = [g for g in range(K) if 0 < len(picked[g]) < G]
    full = [g for g in range(K) if len(picked[g]) == G]
    groups = partial[:1] + full + partial[1:] + [g for g in range(K) if not picked[g]]
    head_order = []
    for g in groups:
        rest = [h for h in members[g] if h not in chosen]
        last = g in partial and partial.index(g) % 2 == 0  # partial₀, partial₂, …: selected heads last
        head_order += rest + picked[g] if last else picked[g] + rest
    channel_order = list(channels) + [j for j in range(F) if j not in set(channels)]
    return groups, head_order, channel_order


class MyS2FT(MyLowRank):
    name = "my-s2ft"

    def supports(self, config):
        """The families this port computes: Llama and Qwen2 without a sliding window. The spec then
        draws only those (it also defines Qwen3's q/k norms, windows, Gemma 3 and GPT-2)."""
        return config["model_type"] in ("llama", "qwen2") and "sliding_window" not in config

    def copermute(self, config, weights, heads, channels):
        D = config["head_dim"]
        out, state = dict(weights), {}
        for i in heads:
            groups, head_order, channel_order = layer_orders(config, heads[i], channels[i])
            q_idx, kv_idx = head_rows(head_order, D), head_rows(groups, D)
            p = f"model.layers.{i}"
            rows = {"self_attn.q_proj": q_idx, "self_attn.k_proj": kv_idx, "self_attn.v_proj": kv_idx,
                    "mlp.gate_proj": channel_order, "mlp.up_proj": channel_order}
            for module, idx in rows.items():  # output rows move, and the biases that sit on them
                for part in ("weight", "bias"):
                    if f"{p}.{module}.{part}" in weights:
                        out[f"{p}.{module}.{part}"] = weights[f"{p}.{module}.{part}"][idx]
            out[f"{p}.self_attn.o_proj.weight"] = weights[f"{p}.self_attn.o_proj.weight"][:, q_idx]
            out[f"{p}.mlp.down_proj.weight"] = weights[f"{p}.mlp.down_proj.weight"][:, channel_order]
            state[i] = (q_idx, kv_idx, np.array(channel_order))
        return out, state

    def unpermute(self, config, weights, state):
        out = dict(weights)
        for i, (q_idx, kv_idx, ch_idx) in state.items():
            p = f"model.layers.{i}"
            moved = [(f"{p}.{m}.{part}", idx, 0) for m, idx in (("self_attn.q_proj", q_idx),
                     ("self_attn.k_proj", kv_idx), ("self_attn.v_proj", kv_idx), ("mlp.gate_proj", ch_idx),
                     ("mlp.up_proj", ch_idx)) for part in ("weight", "bias")]
            moved += [(f"{p}.self_attn.o_proj.weight", q_idx, 1), (f"{p}.mlp.down_proj.weight", ch_idx, 1)]
            for key, idx, axis in moved:
                if key not in weights:
                    continue
                restored = np.empty_like(weights[key])
                if axis == 0:
                    restored[idx] = weights[key]  # the row that moved to position n goes back to idx[n]
                else:
                    restored[:, idx] = weights[key]
                out[key] = restored
        return out


# %% [markdown]
# ## 6. S2FT's partial backward, from NumPy alone
#
# `s2ft_block_grads` must return, for every layer, the gradient of the selected columns of O and
# Down (heads in selection order, each head's D columns; channels in selection order), in original
# coordinates. Computing it needs the decoder's forward and backward, so the port carries its own:
# a Llama-family decoder (RMSNorm, RoPE, grouped-query causal attention, SwiGLU, a tied or untied
# head) in about 120 lines, each backward being the rule tutorials 01–04 derive. The spec's
# reference decoder (`minift.spec.reference`, forward only) is the oracle it is checked against,
# not a part of it.
#
# The *partial* part is one line, in `linear_back`: a linear layer `y = x Wᵀ + b` always returns
# `dx = dy W` (the layers below need it), but its weight gradient is computed only where `want`
# asks for one, and then only for the trained columns — `dyᵀ x[:, cols]`, N·O·S multiply-adds
# instead of N·O·I. (In a training loop co-permutation makes `cols` a contiguous range, so
# `W[:, a:b]` is a view that the optimizer updates in place; the gradient's values do not depend on
# the layout, so the port indexes the original columns directly.) The backward also stops below the
# lowest layer that trains: nothing under it has a gradient to compute.
#
# One symbol the code uses: `want(name)` is `None` for a frozen weight, `ALL` for a fully trained
# one, and a list of column indices for an S2FT column block.

# %%
ALL = slice(None)


def inv_freq(config):
    """RoPE's (D/2,) frequencies 1/θ^(2j/D), rescaled as the config's rope_scaling says."""
    D = config["head_dim"]
    inv = 1.0 / config["rope_theta"] ** (np.arange(0, D, 2) / D)
    sc = config.get("rope_scaling") or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":  # low frequencies divided by factor, high ones kept, a ramp in between
        ramp = (sc["original_max_position_embeddings"] * inv / (2 * np.pi) - sc["low_freq_factor"]) / (
            sc["high_freq_factor"] - sc["low_freq_factor"])
        s = np.clip(ramp, 0.0, 1.0)
        return (1 - s) * inv / sc["factor"] + s * inv
    return inv


def rope(x, cos, sin, sign=1.0):
    """Turn the pairs (i, i + D/2) of x (B, n, T, D) by +angle; sign=−1 turns back (the backward:
    a rotation's transpose is its inverse)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin], axis=-1)


def rms(x, w, eps):
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return w * x * r, (x * r, r)


def rms_back(dy, w, cache):
    n, r = cache  # y = w ⊙ n, n = x·r:  dx = r (dn − n · mean(dn ⊙ n)),  dw = Σ dy ⊙ n
    dn = dy * w
    return r * (dn - n * (dn * n).mean(-1, keepdims=True)), (dy * n).sum((0, 1))


def linear(w, name, x):
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y


def linear_back(w, name, dy, x, want, grads):
    """dx = dy W always; dW = dyᵀ x only for the columns `want(name)` trains (partial backward)."""
    cols = want(name)
    if cols is not None:
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        grads[name + ".weight"] = dy2.T @ x2[:, cols]  # N·O·S multiply-adds, not N·O·I
        if cols is ALL and name + ".bias" in w:
            grads[name + ".bias"] = dy2.sum(0)
    return dy @ w[name + ".weight"]


def split_heads(x, n):  # (B, T, n·D) → (B, n, T, D)
    return x.reshape(*x.shape[:2], n, -1).transpose(0, 2, 1, 3)


def merge_heads(x):  # (B, n, T, D) → (B, T, n·D)
    return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)


def forward(config, w, tokens):
    """Logits (B, T, V) and what the backward needs, per layer."""
    H, K, D, eps = (config[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                        "rms_norm_eps"))
    T = tokens.shape[1]
    angle = np.arange(T)[:, None] * inv_freq(config)[None]
    rot = (np.cos(angle), np.sin(angle))
    causal = np.tril(np.ones((T, T), dtype=bool))  # query t reads keys s ≤ t
    x, caches = w["model.embed_tokens.weight"][tokens], []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h, n1 = rms(x, w[p + "input_layernorm.weight"], eps)
        q = rope(split_heads(linear(w, p + "self_attn.q_proj", h), H), *rot)
        k = rope(split_heads(linear(w, p + "self_attn.k_proj", h), K), *rot)
        v = split_heads(linear(w, p + "self_attn.v_proj", h), K)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)  # head h reads kv h // G
        s = np.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(D), -np.inf)
        P = np.exp(s - s.max(-1, keepdims=True))
        P /= P.sum(-1, keepdims=True)
        a = merge_heads(P @ v)
        x = x + linear(w, p + "self_attn.o_proj", a)
        h2, n2 = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        g, u = linear(w, p + "mlp.gate_proj", h2), linear(w, p + "mlp.up_proj", h2)
        sig = 1.0 / (1.0 + np.exp(-g))
        m = g * sig * u  # silu(g) ⊙ u
        x = x + linear(w, p + "mlp.down_proj", m)
        caches.append((h, n1, q, k, v, P, a, h2, n2, g, sig, u, m))
    hf, nf = rms(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])  # tied: the embedding
    return hf @ head.T, (rot, caches, hf, nf)


def loss_and_backward(config, w, tokens, targets, want, lowest=0):
    """Mean cross-entropy over targets ≠ −100 and the gradients `want` asks for, layers ≥ lowest."""
    H, K, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    z, (rot, caches, hf, nf) = forward(config, w, tokens)
    P = np.exp(z - z.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    keep = targets != -100
    b, t = np.nonzero(keep)
    loss = -np.log(P[b, t, targets[b, t]]).mean()
    dz = P * keep[..., None]
    dz[b, t, targets[b, t]] -= 1.0
    dz /= keep.sum()  # softmax − one-hot, over the kept positions, divided by their number
    grads, tied = {}, "lm_head.weight" not in w
    head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    if want("lm_head") is not None:
        grads["model.embed_tokens.weight" if tied else "lm_head.weight"] = (
            dz.reshape(-1, dz.shape[-1]).T @ hf.reshape(-1, hf.shape[-1]))
    dx, dnorm = rms_back(dz @ head, w["model.norm.weight"], nf)
    if want("model.norm") is not None:
        grads["model.norm.weight"] = dnorm
    for i in reversed(range(lowest, config["num_hidden_layers"])):
        h, n1, q, k, v, P, a, h2, n2, g, sig, u, m = caches[i]
        p = f"model.layers.{i}."
        dm = linear_back(w, p + "mlp.down_proj", dx, m, want, grads)
        dg = dm * u * sig * (1 + g * (1 - sig))  # silu'(g) = σ(g) (1 + g (1 − σ(g)))
        dh2 = (linear_back(w, p + "mlp.gate_proj", dg, h2, want, grads)
               + linear_back(w, p + "mlp.up_proj", dm * g * sig, h2, want, grads))
        dh2, dnorm = rms_back(dh2, w[p + "post_attention_layernorm.weight"], n2)
        dx = dx + dh2
        if want(p + "post_attention_layernorm") is not None:
            grads[p + "post_attention_layernorm.weight"] = dnorm
        da = split_heads(linear_back(w, p + "self_attn.o_proj", dx, a, want, grads), H)
        dP = da @ v.swapaxes(-1, -2)
        ds = P * (dP - (dP * P).sum(-1, keepdims=True)) / np.sqrt(D)  # the softmax backward
        dq, dk, dv = ds @ k, ds.swapaxes(-1, -2) @ q, P.swapaxes(-1, -2) @ da
        B, T = tokens.shape
        dk, dv = (d.reshape(B, K, H // K, T, D).sum(2) for d in (dk, dv))  # sum over each group
        dq, dk = rope(dq, *rot, sign=-1.0), rope(dk, *rot, sign=-1.0)
        dh = sum(linear_back(w, p + f"self_attn.{n}_proj", merge_heads(d), h, want, grads)
                 for n, d in (("q", dq), ("k", dk), ("v", dv)))
        dh, dnorm = rms_back(dh, w[p + "input_layernorm.weight"], n1)
        dx = dx + dh
        if want(p + "input_layernorm") is not None:
            grads[p + "input_layernorm.weight"] = dnorm
    if lowest == 0 and want("model.embed_tokens") is not None:
        dE = grads.get("model.embed_tokens.weight", np.zeros_like(w["model.embed_tokens.weight"]))
        np.add.at(dE, tokens, dx)  # scatter-add: a token seen twice collects both gradients
        grads["model.embed_tokens.weight"] = dE
    return float(loss), grads


class MyPort(MyS2FT):
    """LoRA, PiSSA, SORSA (MyLowRank), S2FT's co-permutation (MyS2FT) and, now, the decoder and
    S2FT's partial backward: every operation the S2FT and low-rank properties call."""

    name = "my-port"

    def decoder_logits(self, config, weights, tokens):
        return forward(config, weights, tokens)[0]

    def decoder_loss_and_grads(self, config, weights, tokens, targets):
        return loss_and_backward(config, weights, tokens, targets, want=lambda name: ALL)

    def s2ft_block_grads(self, config, weights, tokens, targets, heads, channels):
        D, L = config["head_dim"], config["num_hidden_layers"]
        cols = {}
        for i in range(L):
            p = f"model.layers.{i}."
            cols[p + "self_attn.o_proj"] = [h * D + d for h in heads.get(i, []) for d in range(D)]
            cols[p + "mlp.down_proj"] = list(channels.get(i, []))
        lowest = min([i for i in range(L) if heads.get(i) or channels.get(i)], default=L)
        _, grads = loss_and_backward(config, weights, tokens, targets, want=cols.get, lowest=lowest)
        return {name + ".weight": grads.get(name + ".weight", np.zeros((config["hidden_size"], 0)))
                for name in cols}


port = MyPort()

# %% [markdown]
# First the decoder against the oracle — the spec's reference forward, on three hand-picked configs
# (MHA with linear RoPE scaling; GQA with biases; one key/value head with Llama-3 RoPE scaling and a
# tied head) — and the backward against finite differences. `prop.hypothesis.inner_test` runs a
# property on one chosen input. (The generated inputs of these two properties include GPT-2, which
# this port does not implement.)

# %%
from minift.spec.properties import GQA, GQA4, MHA

for cfg in (MHA, GQA, GQA4):
    for name in ("decoder_logits_and_loss_equal_the_reference", "decoder_gradient_matches_finite_differences",
                 "decoder_is_causal"):
        kwargs = {"t": 2} if name == "decoder_is_causal" else {}
        PROPERTIES[name].hypothesis.inner_test(port, config=cfg, seed=0, **kwargs)
print("the port's decoder: logits and loss = the reference, gradient = finite differences, causal")

# %% [markdown]
# Then every S2FT property, with Hypothesis drawing the configurations (MHA, GQA, multi-query;
# biases or not; tied head or not; RoPE scaling or not) and the selections. The spec also draws
# families this port does not compute (Qwen3's q/k norms, sliding windows, Gemma 3); the port's
# `supports(config)`, defined with `MyS2FT` above, says which configs it computes, and the
# properties skip the others rather than fail on them:

# %%
s2ft_props = [n for n in PROPERTIES if "permut" in n or "s2ft" in n]
assert len(s2ft_props) == 4
for name in s2ft_props:
    PROPERTIES[name](port)
    print("passed:", name)


# %% [markdown]
# ## 7. Two slips: one the spec catches, one it cannot see
#
# A realistic slip in the co-permutation: moving the heads' rows of Q, K and V but forgetting that
# O *reads* the heads, so its columns must move too. Every matrix still has the right shape and
# `unpermute` still inverts `copermute` exactly — but the model now computes a different function,
# and the spec says so, with the shrunk input that shows it:

# %%
class ForgotO(MyPort):
    def copermute(self, config, weights, heads, channels):
        out, state = super().copermute(config, weights, heads, channels)
        for i in heads:
            key = f"model.layers.{i}.self_attn.o_proj.weight"
            out[key] = weights[key]  # O left in the original order
        return out, state


try:
    PROPERTIES["copermuting_heads_and_channels_leaves_the_logits_unchanged"](ForgotO())
    report = ""
except AssertionError as e:
    report = "\n".join([str(e), *getattr(e, "__notes__", [])])
print(report)
assert "logits of the co-permuted model" in report

# %% [markdown]
# A shortcut in the backward: compute the *whole* gradient and slice the selected columns out of
# it. The numbers are the same — the block gradient is, by definition, the full gradient's
# columns — so the spec, which compares numbers, passes it:

# %%
class SlicedFull(MyPort):
    def s2ft_block_grads(self, config, weights, tokens, targets, heads, channels):
        _, full = self.decoder_loss_and_grads(config, weights, tokens, targets)  # every gradient
        D, out = config["head_dim"], {}
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            out[p + "self_attn.o_proj.weight"] = full[p + "self_attn.o_proj.weight"][
                :, [h * D + d for h in heads[i] for d in range(D)]]
            out[p + "mlp.down_proj.weight"] = full[p + "mlp.down_proj.weight"][:, channels[i]]
        return out


PROPERTIES["s2ft_block_gradients_equal_the_full_gradient_restricted_to_the_block"](SlicedFull())
print("the sliced full gradient passes the spec: the values are right, only the work is not")

# %% [markdown]
# What partial backpropagation saves is work and memory, and no property of the returned arrays
# can see that — any check of outputs that a correct port passes, the sliced one passes too. So
# check the cost where it is visible, in your own code: wrap `linear_back` to count the
# multiply-adds of the weight gradients (N·O·S for a block of S columns, N·O·I for a whole
# weight) and compare the two ports on one input. (Tutorial 09 measures the same saving in
# minift's training step: memory, FLOPs and time.)

# %%
from minift.spec.cases import random_selection, random_tokens, random_weights

plain_linear_back, madds = linear_back, [0]


def counting_linear_back(w, name, dy, x, want, grads):  # linear_back, counting dW's multiply-adds
    cols = want(name)
    if cols is not None:
        madds[0] += dy[..., 0].size * dy.shape[-1] * x[..., cols].shape[-1]
    return plain_linear_back(w, name, dy, x, want, grads)


def weight_grad_madds(impl, config, seed=0):
    """The weight-gradient multiply-adds of impl.s2ft_block_grads on one input, one head and two
    channels per layer (the counting version of linear_back stands in while it runs)."""
    global linear_back
    weights, (tokens, targets) = random_weights(config, seed), random_tokens(config, seed)
    heads, channels = random_selection(config, seed, 1, 2)
    madds[0], linear_back = 0, counting_linear_back
    try:
        impl.s2ft_block_grads(config, weights, tokens, targets, heads, channels)
    finally:
        linear_back = plain_linear_back
    return madds[0]


partial_cost, sliced_cost = weight_grad_madds(port, GQA), weight_grad_madds(SlicedFull(), GQA)
print(f"weight-gradient multiply-adds, one head and two channels per layer: partial {partial_cost}, "
      f"sliced full gradient {sliced_cost} ({sliced_cost / partial_cost:.0f}×)")
assert sliced_cost > 4 * partial_cost


# %% [markdown]
# ## 8. Test vectors for any language
#
# `export_vectors(folder)` (also `minift spec export DIR`) writes each canonical case as
# `arrays.safetensors` (float64 inputs and expected outputs) plus `case.json` (the property, the
# call, the scalars, and each output's tolerance: |actual − expected| ≤ atol + rtol·|expected|).
# Checking an implementation against them needs only a safetensors reader. Here, the LoRA and
# SORSA-split cases against `MyLowRank`:

# %%
folders = export_vectors(work / "spec-vectors")
print(sorted(f.name for f in folders))


def check(case, name, actual):
    tol = case["tolerance"][name]
    np.testing.assert_allclose(actual, arrays[f"expected/{name}"], rtol=tol["rtol"], atol=tol["atol"])


case = json.loads((work / "spec-vectors/lora/case.json").read_text())
arrays, _ = read_safetensors(work / "spec-vectors/lora/arrays.safetensors")
inp = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("input/")}
s = case["scalars"]["scaling"]
check(case, "y", mine.lora_forward(inp["x"], inp["W"], inp["A"], inp["B"], s))
check(case, "merged", mine.lora_merge(inp["W"], inp["A"], inp["B"], s))

case = json.loads((work / "spec-vectors/sorsa_split/case.json").read_text())
arrays, _ = read_safetensors(work / "spec-vectors/sorsa_split/arrays.safetensors")
W_res, B, S, A = mine.sorsa_split(arrays["input/W"], case["scalars"]["r"])
check(case, "W_res", W_res)
check(case, "S", S)
# singular vectors are unique up to sign: the vectors give the sign-free product B diag(S) A
check(case, "BSA", B @ np.diag(S) @ A)
print("my implementation matches the exported vectors of", case["name"], "and lora")

# %% [markdown]
# Every other case is read the same way; `minift.spec.export.outputs_of(impl, case, inputs)` is each
# case's `call` line as code. The whole port against every vector of a family it computes (a decoder
# case whose config the port's `supports` rejects is skipped), with the tolerance rule above:

# %%
checked = 0
for folder in folders:
    case = json.loads((folder / "case.json").read_text())
    config = case["scalars"].get("config")
    if config is not None and not port.supports(config):
        continue
    arrays, _ = read_safetensors(folder / "arrays.safetensors")
    inputs = {k.removeprefix("input/"): v for k, v in arrays.items() if k.startswith("input/")}
    for name, actual in outputs_of(port, case, inputs).items():
        check(case, name, actual)
    checked += 1
print(f"the port matches {checked} of the {len(folders)} vectors: every Llama/Qwen2 and low-rank case")

# %% [markdown]
# ## Summary
#
# * The spec is a list of properties over a small interface of float64 arrays with Hugging Face
#   names; any implementation can plug in with an adapter.
# * Hypothesis explores shapes and seeds and shrinks failures to minimal counterexamples.
# * State definitions as well as invariants: a squared regularizer satisfies the invariants and
#   fails the definition.
# * A port of S2FT needs a decoder backward with one change: weight gradients only for the
#   trained columns, `dyᵀ x[:, cols]`. The spec checks the values; the saving is checked by
#   counting the work.
# * Exported vectors (safetensors + JSON) check implementations outside Python.
#
# ## Exercises
#
# 1. **Another slip.** Write a PiSSA that forgets to divide σ by the scaling (A = diag(√σ) Vᵀ,
#    B = U diag(√σ)) and find which property catches it, and for which `alpha`.
# 2. **The tolerance rule.** Write the test every vector applies to one output,
#    |actual − expected| ≤ atol + rtol·|expected| entrywise, as a function returning True or False.
# 3. **The cost of the partial backward.** Give the number of weight-gradient multiply-adds the
#    port's `s2ft_block_grads` performs, as a formula in N = B·T tokens, the width C, the head
#    width D, the layers L, and the heads and channels selected per layer; compare with
#    `weight_grad_madds`.
#
# Solutions: `tutorials/solutions/12_checking_your_implementation.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: the
# check prints "not answered yet" while a function returns None, "correct" when your answer is
# right, and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def pissa_init(W, r, alpha):
    """Exercise 1: PiSSA's initialisation as the interface states it, (W_res, A, B), with scaling
    s = alpha / r — written correctly, so that the spec's PiSSA properties pass."""
    return None  # your code here


def check_pissa_init(pissa_init):
    if pissa_init(np.eye(2), 1, 1.0) is None:
        print("exercise 1: not answered yet")
        return

    class Yours(MyLowRank):
        def pissa_init(self, W, r, alpha):
            return pissa_init(W, r, alpha)

    for name in PROPERTIES:
        if name.startswith("pissa"):
            PROPERTIES[name](Yours())
    print("exercise 1: correct")


check_pissa_init(pissa_init)


# %%
def within_tolerance(actual, expected, rtol, atol):
    """Exercise 2: True when every entry satisfies |actual − expected| ≤ atol + rtol·|expected|."""
    return None  # your code here


def check_within_tolerance(within_tolerance):
    if within_tolerance(np.ones(2), np.ones(2), 0.0, 0.0) is None:
        print("exercise 2: not answered yet")
        return
    e = np.array([100.0, -2.0, 0.0])
    cases = [  # (actual, rtol, atol, verdict)
        (e, 0.0, 0.0, True),
        (e + np.array([0, 0, 0.5]), 0.25, 0.0, False),   # near zero only atol can help …
        (e + np.array([0, 0, 0.5]), 0.25, 0.5, True),
        (e + np.array([0, 0.25, 0]), 0.25, 0.0, True),   # … rtol scales |expected|, whatever its sign …
        (e + np.array([0, 1.0, 0]), 0.25, 0.0, False),   # … entry by entry: the 100 does not cover the −2 …
        (e + np.array([50, 0, 0]), 0.375, 0.0, False),   # … and |expected|, not |actual|
    ]
    for k, (a, rtol, atol, verdict) in enumerate(cases):
        got = bool(within_tolerance(np.array(a), e, rtol, atol))
        assert got == verdict, f"case {k}: expected {verdict} for rtol={rtol}, atol={atol}"
    print("exercise 2: correct")


check_within_tolerance(within_tolerance)


# %%
def block_grad_madds(N, C, D, L, n_heads, n_channels):
    """Exercise 3: the weight-gradient multiply-adds of the port's s2ft_block_grads, for n_heads
    heads and n_channels channels selected in each of L layers, on N tokens."""
    return None  # your code here


def check_block_grad_madds(block_grad_madds):
    if block_grad_madds(1, 1, 1, 1, 1, 1) is None:
        print("exercise 3: not answered yet")
        return
    for config in (MHA, GQA, GQA4):
        C, D, L = config["hidden_size"], config["head_dim"], config["num_hidden_layers"]
        got = block_grad_madds(12, C, D, L, 1, 2)  # random_tokens: B = 2, T = 6
        assert got == weight_grad_madds(port, config), f"{got}, counted {weight_grad_madds(port, config)}"
    print("exercise 3: correct")


check_block_grad_madds(block_grad_madds)
