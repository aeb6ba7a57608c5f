"""A second, independent implementation of the minift spec interface, in PyTorch.

Gradients come from torch autograd on a Llama decoder written here in float64 (transformers' own
runs RMSNorm and RoPE in float32, too coarse for float64 finite differences; its float32 logits and
gradients are compared with minift in test_against_transformers.py). LoRA merge, unmerge and forward
come from PEFT's ``lora.Linear``. The S2FT co-permutation is written here from the method's
definition, not from minift's code. PiSSA follows PEFT's algorithm, transcribed in torch because
PEFT refuses float64 and the spec is stated in float64.
Run the spec against it with ``pytest --pyargs minift.spec --impl tests.crosscheck.torch_impl``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear

Weights = dict[str, np.ndarray]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _inv_freq(config: dict[str, Any], layer_type: str | None = None) -> torch.Tensor:
    """RoPE frequencies in float64, rescaled as transformers' ``_compute_*_parameters`` do; Gemma 3's
    from ``rope_parameters[layer_type]``."""
    D = config["head_dim"]
    theta, scaling = config.get("rope_theta"), config.get("rope_scaling") or {}
    if layer_type is not None:
        scaling = config["rope_parameters"][layer_type]
        theta = scaling["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low, inv / factor, inv)
        smooth = (old / wavelen - scaling["low_freq_factor"]) / (
            scaling["high_freq_factor"] - scaling["low_freq_factor"]
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high) & ~(wavelen > low)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def _bias(config: dict[str, Any], kind: str) -> bool:
    t = config["model_type"]
    attention = t in ("llama", "qwen3", "gemma3_text") and config.get("attention_bias", False)
    if kind == "qkv":
        return t == "qwen2" or attention
    return attention if kind == "o" else t == "llama" and config.get("mlp_bias", False)


def _sliding(config: dict[str, Any], layer: int) -> bool:
    """Whether a layer attends through the sliding window (Mistral: all; Qwen, Gemma: per layer_types)."""
    if config.get("sliding_window") is None:
        return False
    t = config["model_type"]
    if t in ("qwen2", "qwen3") and not config.get("use_sliding_window"):
        return False
    return t == "mistral" or config["layer_types"][layer] == "sliding_attention"


def _lin(w: dict[str, torch.Tensor], name: str, x: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.nn.functional.linear(x, w[f"{name}.weight"], w[f"{name}.bias"] if bias else None)


def llama_forward(config: dict[str, Any], w: dict[str, torch.Tensor], tokens: np.ndarray) -> torch.Tensor:
    """The Llama/Mistral/Qwen2/Qwen3/Gemma 3 decoder in float64 throughout, RoPE tables included (transformers
    computes RMSNorm and RoPE in float32, which would make float64 finite differences meaningless)."""
    if config["model_type"] == "gpt2":
        return gpt2_forward(config, w, tokens)
    H, K, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps = config["rms_norm_eps"]
    ids = torch.tensor(tokens)
    B, T = ids.shape
    gemma = config["model_type"] == "gemma3_text"
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    W = config.get("sliding_window") or T
    in_window = causal & ~torch.ones(T, T, dtype=torch.bool).tril(-W)  # i − W < j ≤ i
    scale = config["query_pre_attn_scalar"] ** -0.5 if gemma else D**-0.5

    def norm(y: torch.Tensor, name: str) -> torch.Tensor:  # Gemma 3 scales by (1 + w)
        return _rmsnorm(y, w[name] + 1.0 if gemma else w[name], eps)

    x = w["model.embed_tokens.weight"][ids]
    if gemma:
        x = x * math.sqrt(config["hidden_size"])
    qkv_b, o_b, mlp_b = _bias(config, "qkv"), _bias(config, "o"), _bias(config, "mlp")
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        ang = torch.arange(T, dtype=torch.float64)[:, None] * _inv_freq(
            config, config["layer_types"][i] if gemma else None)[None]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # (T, D)
        h = norm(x, f"{p}.input_layernorm.weight")
        q = _lin(w, f"{p}.self_attn.q_proj", h, qkv_b).view(B, T, H, D).transpose(1, 2)
        k = _lin(w, f"{p}.self_attn.k_proj", h, qkv_b).view(B, T, K, D).transpose(1, 2)
        v = _lin(w, f"{p}.self_attn.v_proj", h, qkv_b).view(B, T, K, D).transpose(1, 2)
        if f"{p}.self_attn.q_norm.weight" in w:  # Qwen3, Gemma 3: per head, over D
            q, k = norm(q, f"{p}.self_attn.q_norm.weight"), norm(k, f"{p}.self_attn.k_norm.weight")
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        mask = in_window if _sliding(config, i) else causal
        scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        a = _lin(w, f"{p}.self_attn.o_proj", a, o_b)
        x = x + (norm(a, f"{p}.post_attention_layernorm.weight") if gemma else a)
        mlp_norm = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
        h = norm(x, f"{p}.{mlp_norm}.weight")
        gate, up = _lin(w, f"{p}.mlp.gate_proj", h, mlp_b), _lin(w, f"{p}.mlp.up_proj", h, mlp_b)
        act = torch.nn.functional.gelu(gate, approximate="tanh") if gemma else torch.nn.functional.silu(gate)
        m = _lin(w, f"{p}.mlp.down_proj", act * up, mlp_b)
        x = x + (norm(m, f"{p}.post_feedforward_layernorm.weight") if gemma else m)
    head = w["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return norm(x, "model.norm.weight") @ head.T


def gpt2_forward(config: dict[str, Any], w: dict[str, torch.Tensor], tokens: np.ndarray) -> torch.Tensor:
    """GPT-2 in float64: Conv1D weights [in, out], fused c_attn, tanh-GELU, tied head."""
    F = torch.nn.functional
    C, H, eps = config["n_embd"], config["n_head"], config["layer_norm_epsilon"]
    ids = torch.tensor(tokens)
    B, T = ids.shape

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (C,), w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def conv(x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.addmm(w[f"{name}.bias"], x.reshape(-1, x.shape[-1]), w[f"{name}.weight"]).view(B, T, -1)

    x = w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][:T]
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}"
        q, k, v = conv(ln(x, f"{p}.ln_1"), f"{p}.attn.c_attn").split(C, dim=-1)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + conv(a, f"{p}.attn.c_proj")
        x = x + conv(F.gelu(conv(ln(x, f"{p}.ln_2"), f"{p}.mlp.c_fc"), approximate="tanh"), f"{p}.mlp.c_proj")
    return ln(x, "transformer.ln_f") @ w["transformer.wte.weight"].T


def _loss(logits: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1), ignore_index=-100
    )


class TorchImplementation:
    name = "torch"

    def decoder_logits(self, config: dict[str, Any], weights: Weights, tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return llama_forward(config, {k: _t(v) for k, v in weights.items()}, tokens).numpy()

    def _grads(
        self, config: dict[str, Any], weights: Weights, tokens, targets, trainable
    ) -> tuple[float, dict]:
        w = {k: _t(v).requires_grad_(trainable(k)) for k, v in weights.items()}
        loss = _loss(llama_forward(config, w, tokens), targets)
        loss.backward()
        return float(loss.detach()), {k: t.grad.numpy() for k, t in w.items() if t.requires_grad}

    def decoder_loss_and_grads(
        self, config: dict[str, Any], weights: Weights, tokens: np.ndarray, targets: np.ndarray
    ) -> tuple[float, Weights]:
        return self._grads(config, weights, tokens, targets, lambda key: True)

    # S2FT -----------------------------------------------------------------------------------------

    @staticmethod
    def _head_order(config: dict[str, Any], selected: list[int]) -> tuple[list[int], list[int]]:
        """Query-head and kv-head orders of the documented minimal layout: groups ordered partial₀,
        full…, partial₁, partial₂, …, empty…; inside partial₀, partial₂, … the selected heads go last,
        elsewhere first. Whole groups move, so every query head keeps reading its own kv head."""
        H, K = config["num_attention_heads"], config["num_key_value_heads"]
        G = H // K
        members = {g: range(g * G, (g + 1) * G) for g in range(K)}
        n = {g: len(set(members[g]) & set(selected)) for g in range(K)}
        partial = [g for g in range(K) if 0 < n[g] < G]
        groups = partial[:1] + [g for g in range(K) if n[g] == G] + partial[1:]
        groups += [g for g in range(K) if n[g] == 0]
        q_order = []
        for g in groups:
            sel = [h for h in members[g] if h in selected]
            rest = [h for h in members[g] if h not in selected]
            q_order += rest + sel if g in partial[0::2] else sel + rest
        return q_order, groups

    @staticmethod
    def _gather_layer(out: Weights, weights: Weights, layer: int, q: Any, kv: Any, ch: Any) -> None:
        """Reorder one layer's coupled matrices: Q rows and O columns by ``q``, K/V rows by ``kv``,
        Gate/Up rows and Down columns by ``ch``."""
        p = f"model.layers.{layer}"
        for name, idx, axis in (
            ("self_attn.q_proj", q, 0), ("self_attn.k_proj", kv, 0), ("self_attn.v_proj", kv, 0),
            ("self_attn.o_proj", q, 1), ("mlp.gate_proj", ch, 0), ("mlp.up_proj", ch, 0),
            ("mlp.down_proj", ch, 1),
        ):
            out[f"{p}.{name}.weight"] = np.take(weights[f"{p}.{name}.weight"], idx, axis=axis)
            if axis == 0 and f"{p}.{name}.bias" in weights:  # an output bias moves with its rows
                out[f"{p}.{name}.bias"] = np.take(weights[f"{p}.{name}.bias"], idx)

    def copermute(
        self, config: dict[str, Any], weights: Weights, heads: dict, channels: dict
    ) -> tuple[Weights, Any]:
        D, F = config["head_dim"], config["intermediate_size"]
        out = dict(weights)
        state = {}
        for i in range(config["num_hidden_layers"]):
            q_order, kv_order = self._head_order(config, heads[i])
            ch = list(channels[i]) + [c for c in range(F) if c not in channels[i]]
            q_rows = [r for h in q_order for r in range(h * D, (h + 1) * D)]
            kv_rows = [r for g in kv_order for r in range(g * D, (g + 1) * D)]
            self._gather_layer(out, weights, i, q_rows, kv_rows, ch)
            state[i] = (q_rows, kv_rows, ch)
        return out, state

    def unpermute(self, config: dict[str, Any], weights: Weights, state: Any) -> Weights:
        out = dict(weights)
        for i, (q_rows, kv_rows, ch) in state.items():
            self._gather_layer(out, weights, i, np.argsort(q_rows), np.argsort(kv_rows), np.argsort(ch))
        return out

    def s2ft_block_grads(self, config, weights, tokens, targets, heads, channels) -> Weights:
        """Autograd with only the O and Down weights trainable, restricted to the selected columns."""
        _, grads = self._grads(
            config, weights, tokens, targets, lambda key: key.endswith(("o_proj.weight", "down_proj.weight"))
        )
        D, out = config["head_dim"], {}
        for i in range(config["num_hidden_layers"]):
            o = f"model.layers.{i}.self_attn.o_proj.weight"
            out[o] = grads[o][:, [c for h in heads[i] for c in range(h * D, (h + 1) * D)]]
            d = f"model.layers.{i}.mlp.down_proj.weight"
            out[d] = grads[d][:, channels[i]]
        return out

    # LoRA and PiSSA ------------------------------------------------------------------------------

    @staticmethod
    def _peft_lora(W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float) -> Any:
        r = A.shape[0]
        base = torch.nn.Linear(W.shape[1], W.shape[0], bias=False).to(torch.float64)
        base.weight.data = _t(W)
        layer = PeftLoraLinear(
            base, "default", LoraConfig(r=r, lora_alpha=scaling * r), r=r, lora_alpha=scaling * r
        )
        layer.to(torch.float64)
        layer.lora_A["default"].weight.data = _t(A)
        layer.lora_B["default"].weight.data = _t(B)
        assert abs(layer.scaling["default"] - scaling) < 1e-12
        return layer

    def lora_forward(self, x, W, A, B, scaling) -> np.ndarray:
        with torch.no_grad():
            return self._peft_lora(W, A, B, scaling)(_t(x)).numpy()

    def lora_merge(self, W, A, B, scaling) -> np.ndarray:
        layer = self._peft_lora(W, A, B, scaling)
        layer.merge()
        return layer.base_layer.weight.detach().numpy().copy()

    def lora_unmerge(self, W, A, B, scaling) -> np.ndarray:
        layer = self._peft_lora(W, A, B, scaling)
        layer.merged_adapters = ["default"]  # W is taken as already merged
        layer.unmerge()
        return layer.base_layer.weight.detach().numpy().copy()

    def pissa_init(self, W, r, alpha) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """PEFT's ``pissa_init`` (exact SVD), in float64."""
        scaling = alpha / r
        Wt = _t(W)
        V, S, Uh = torch.linalg.svd(Wt, full_matrices=False)  # PEFT's names: V is the left factor
        Vr, Sr, Uhr = V[:, :r], S[:r] / scaling, Uh[:r]
        A = torch.diag(torch.sqrt(Sr)) @ Uhr
        B = Vr @ torch.diag(torch.sqrt(Sr))
        return (Wt - scaling * B @ A).numpy(), A.numpy(), B.numpy()

    # SORSA ---------------------------------------------------------------------------------------

    def sorsa_split(self, W, r):
        U, S, Vh = torch.linalg.svd(_t(W), full_matrices=False)
        B, Sr, A = U[:, :r], S[:r], Vh[:r]
        return (_t(W) - B @ torch.diag(Sr) @ A).numpy(), B.numpy(), Sr.numpy(), A.numpy()

    def sorsa_forward(self, x, W_res, B, S, A) -> np.ndarray:
        x = _t(x)
        return (x @ _t(W_res).T + ((x @ _t(A).T) * _t(S)) @ _t(B).T).numpy()

    def sorsa_merge(self, W_res, B, S, A) -> np.ndarray:
        return (_t(W_res) + _t(B) @ torch.diag(_t(S)) @ _t(A)).numpy()

    def sorsa_regularizer(self, factors):
        """SORSA's ``calc_ortho``: the mean of torch.linalg.matrix_norm(·, 'fro'), by autograd."""
        tensors = [(_t(A).requires_grad_(True), _t(B).requires_grad_(True)) for A, B in factors]
        terms = []
        for A, B in tensors:
            terms.append(torch.linalg.matrix_norm(A @ A.T - torch.eye(A.shape[0], dtype=A.dtype)))
            terms.append(torch.linalg.matrix_norm(B.T @ B - torch.eye(B.shape[1], dtype=B.dtype)))
        value = torch.stack(terms).mean()
        value.backward()
        return float(value.detach()), [(A.grad.numpy(), B.grad.numpy()) for A, B in tensors]


implementation = TorchImplementation()
