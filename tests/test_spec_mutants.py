"""The spec has no holes for realistic porting bugs: each mutant below is minift (the default
implementation) with one line changed the way a port to another framework gets it wrong, and each must
fail the spec's properties and, where the vectors cover its family, the exported vectors.

Decoder mutants change one line of the definition (``minift.spec.reference``) while the implementation
computes, and return minift's gradients; the others change one interface method. Each runs only the
properties of its family (a bug fails its family's explicit examples within a second).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from safetensors.numpy import load_file

from minift.spec import reference
from minift.spec.check_vectors import check_case
from minift.spec.export import export_vectors, outputs_of
from minift.spec.minift_impl import MiniftImplementation
from minift.spec.properties import PROPERTIES
from tests.spec_broken import ForgetsTheOColumns, KeepsTheWrongSlice, SquaredRegularizer


class PatchedDecoder(MiniftImplementation):
    """Logits and loss from the reference with one piece replaced (``patches``: name → function) or the
    config edited (``edit``); gradients from minift."""

    def __init__(self, patches: dict[str, Callable] | None = None, edit: Callable | None = None) -> None:
        self.patches, self.edit = patches or {}, edit or (lambda c: c)

    @contextmanager
    def _patched(self):
        if not self.patches:
            yield
            return
        with mock.patch.multiple(reference, **self.patches):
            yield

    def decoder_logits(self, config, weights, tokens):
        with self._patched():
            return reference.logits(self.edit(dict(config)), weights, tokens)

    def decoder_loss_and_grads(self, config, weights, tokens, targets):
        _, grads = super().decoder_loss_and_grads(config, weights, tokens, targets)
        with self._patched():
            return reference.loss(self.edit(dict(config)), weights, tokens, targets), grads


def _interleaved_rope(x, config, layer=0):  # pairs (2i, 2i + 1) instead of (i, i + D/2)
    T = x.shape[2]
    angle = np.arange(T)[:, None] * reference.inv_freq(config, layer)[None]
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return out


def _eps_outside(x, w, eps):
    return w * x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps)


def _one_plus_w(x, w, eps):  # Gemma's (1 + w) norm on a Llama
    return (1 + w) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _gelu_erf(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _unbiased_layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + eps) * w + b


def _tiled_kv(q, k, v, scale, mask):  # query head h reads kv head h % K instead of h // G
    G = q.shape[1] // k.shape[1]
    return _true_attention(q, np.tile(k, (1, G, 1, 1)), np.tile(v, (1, G, 1, 1)), scale, mask)


_true_attention = reference.attention


def _wrong_scale(q, k, v, scale, mask):  # 1/√(C/H) for C = 8, H = 4 or 2 instead of 1/√head_dim
    return _true_attention(q, k, v, 1.0 / np.sqrt(8 / q.shape[1]), mask)


def _peeking_mask(T, W=None):
    return np.tril(np.ones((T, T), dtype=bool), k=1)


def _window_one_wider(config, layer):  # i − W ≤ j ≤ i: W + 1 keys
    W = _true_window(config, layer)
    return None if W is None else W + 1


_true_window = reference.window


def _gemma_scale_by_w(x, w, eps):  # Gemma's norm ported as Llama's
    return reference.rmsnorm(x, w, eps)


def _same_rope_everywhere(config):  # Gemma 3's sliding layers rotated by the global layers' RoPE
    params = config.get("rope_parameters") or {}
    if "full_attention" not in params:
        return config
    return config | {"rope_parameters": {t: params["full_attention"] for t in params}}


def _scale_from_head_dim(config):  # Gemma 3's scale read as 1/√head_dim
    gemma = "query_pre_attn_scalar" in config
    return config | {"query_pre_attn_scalar": config["head_dim"]} if gemma else config


def _window_everywhere(config):  # the window applied to every layer, layer_types ignored
    types = config.get("layer_types")
    return config if types is None else config | {"layer_types": ["sliding_attention"] * len(types)}


def _loss_over_all_positions(config, weights, tokens, targets):
    z = reference.logits(config, weights, tokens)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    keep = targets != -100
    picked = np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
    return float(-(picked * keep).sum() / targets.size)  # averages over ignored positions too


def _loss_per_sequence_mean(config, weights, tokens, targets):
    z = reference.logits(config, weights, tokens)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    keep = targets != -100
    picked = np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
    return float(np.mean(-(picked * keep).sum(1) / keep.sum(1)))  # mean of each sequence's mean


def _llama3_scales_every_band(config, layer=0):
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") != "llama3":
        return _true_inv_freq(config, layer)
    return _true_inv_freq(config | {"rope_scaling": None}, layer) / scaling["factor"]


def _linear_scaling_multiplies(config, layer=0):  # Gemma 3 keeps its scaling in rope_parameters
    inv = _true_inv_freq(config, layer)
    scaling = config.get("rope_scaling") or {}
    return inv * scaling["factor"] ** 2 if scaling.get("rope_type") == "linear" else inv


_true_inv_freq = reference.inv_freq


def _no_bias(kind):
    def has(config, which):
        return False if which == kind else _true_has_bias(config, which)
    return has


_true_has_bias = reference.has_bias


class ZeroBiasGrads(MiniftImplementation):
    def decoder_loss_and_grads(self, config, weights, tokens, targets):
        loss, grads = super().decoder_loss_and_grads(config, weights, tokens, targets)
        return loss, {k: 0 * g if k.endswith("bias") else g for k, g in grads.items()}


class UngroupedHeads(MiniftImplementation):
    """Moves the touched kv groups first but keeps each group's query heads in their original order."""

    def copermute(self, config, weights, heads, channels):
        permuted, state = super().copermute(config, weights, heads, channels)
        H, K, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
        G = H // K
        for i in heads:
            p = f"model.layers.{i}.self_attn"
            k = permuted[f"{p}.k_proj.weight"]
            groups = [next(g for g in range(K) if np.array_equal(k[j * D:(j + 1) * D],
                      weights[f"{p}.k_proj.weight"][g * D:(g + 1) * D])) for j in range(K)]
            rows = [r for g in groups for r in range(g * G * D, (g + 1) * G * D)]
            permuted[f"{p}.q_proj.weight"] = weights[f"{p}.q_proj.weight"][rows]
            permuted[f"{p}.o_proj.weight"] = weights[f"{p}.o_proj.weight"][:, rows]
            if f"{p}.q_proj.bias" in weights:
                permuted[f"{p}.q_proj.bias"] = weights[f"{p}.q_proj.bias"][rows]
        return permuted, (state, permuted)

    def unpermute(self, config, weights, state):
        return super().unpermute(config, weights, state[0])


class BiasesStay(MiniftImplementation):
    def copermute(self, config, weights, heads, channels):
        permuted, state = super().copermute(config, weights, heads, channels)
        return {k: weights[k] if k.endswith("bias") else v for k, v in permuted.items()}, state


class UnpermuteForgetsChannels(MiniftImplementation):
    def unpermute(self, config, weights, state):
        restored = super().unpermute(config, weights, state)
        return {k: weights[k] if ".mlp." in k else v for k, v in restored.items()}


class SortedChannelBlocks(MiniftImplementation):
    def s2ft_block_grads(self, config, weights, tokens, targets, heads, channels):
        return super().s2ft_block_grads(config, weights, tokens, targets, heads,
                                        {i: sorted(c) for i, c in channels.items()})


class HeadWidthCOverH(MiniftImplementation):
    """Slices the O block gradient with C / H columns per head instead of head_dim."""

    def s2ft_block_grads(self, config, weights, tokens, targets, heads, channels):
        out = super().s2ft_block_grads(config, weights, tokens, targets, heads, channels)
        _, full = self.decoder_loss_and_grads(config, weights, tokens, targets)
        w = config["hidden_size"] // config["num_attention_heads"]
        for i, hs in heads.items():
            o = f"model.layers.{i}.self_attn.o_proj.weight"
            out[o] = full[o][:, [c for h in hs for c in range(h * w, h * w + config["head_dim"])]]
        return out


class LoraForwardUnscaled(MiniftImplementation):
    def lora_forward(self, x, W, A, B, scaling):
        return super().lora_forward(x, W, A, B, 1.0)


class LoraMergeUnscaled(MiniftImplementation):
    def lora_merge(self, W, A, B, scaling):
        return super().lora_merge(W, A, B, 1.0)


class LoraUnmergeAdds(MiniftImplementation):
    def lora_unmerge(self, W, A, B, scaling):
        return super().lora_merge(W, A, B, scaling)


class PissaScaling(MiniftImplementation):
    """PiSSA with scaling ``alpha_to_s(alpha, r)`` in place of alpha / r."""

    def __init__(self, alpha_to_s):
        self.alpha_to_s = alpha_to_s

    def pissa_init(self, W, r, alpha):
        return super().pissa_init(W, r, self.alpha_to_s(alpha, r) * r)


class PissaResidualUnscaled(MiniftImplementation):
    def pissa_init(self, W, r, alpha):
        _, A, B = super().pissa_init(W, r, alpha)
        return W - B @ A, A, B


class SorsaResidualIsW(MiniftImplementation):
    def sorsa_split(self, W, r):
        _, B, S, A = super().sorsa_split(W, r)
        return W, B, S, A


class SorsaSTwice(MiniftImplementation):
    def sorsa_forward(self, x, W_res, B, S, A):
        return super().sorsa_forward(x, W_res, B, S * S, A)

    def sorsa_merge(self, W_res, B, S, A):
        return super().sorsa_merge(W_res, B, S * S, A)


class RegularizerSummed(MiniftImplementation):
    def sorsa_regularizer(self, factors):
        value, grads = super().sorsa_regularizer(factors)
        n = 2 * len(factors)
        return value * n, [(n * a, n * b) for a, b in grads]


class RegularizerHalfGradient(MiniftImplementation):
    def sorsa_regularizer(self, factors):
        value, grads = super().sorsa_regularizer(factors)
        return value, [(a / 2, b / 2) for a, b in grads]


class RegularizerWrongGram(MiniftImplementation):
    """‖Aᵀ A − I‖ for A (the I × I Gram) instead of ‖A Aᵀ − I‖."""

    def sorsa_regularizer(self, factors):
        _, grads = super().sorsa_regularizer(factors)
        bad = np.mean([np.linalg.norm(A.T @ A - np.eye(A.shape[1])) for A, _ in factors]
                      + [np.linalg.norm(B.T @ B - np.eye(B.shape[1])) for _, B in factors])
        return float(bad), grads


def _config_edit(**changes: Any) -> Callable:
    return lambda c: c | changes


DECODER, S2FT, LORA, PISSA, SORSA = "decoder", "s2ft", "lora", "pissa", "sorsa"
# (id, implementation, family)
MUTANTS = [
    ("rope-interleaved-pairs", PatchedDecoder({"rope": _interleaved_rope}), DECODER),
    ("rmsnorm-eps-outside-sqrt", PatchedDecoder({"rmsnorm": _eps_outside}), DECODER),
    ("rmsnorm-one-plus-weight", PatchedDecoder({"rmsnorm": _one_plus_w}), DECODER),
    ("eps-hard-coded", PatchedDecoder(edit=_config_edit(rms_norm_eps=1e-6, layer_norm_epsilon=1e-5)),
     DECODER),
    ("theta-hard-coded", PatchedDecoder(edit=_config_edit(rope_theta=10000.0)), DECODER),
    ("rope-scaling-ignored", PatchedDecoder(edit=_config_edit(rope_scaling=None)), DECODER),
    ("linear-rope-multiplies", PatchedDecoder({"inv_freq": _linear_scaling_multiplies}), DECODER),
    ("loss-over-ignored-targets", PatchedDecoder({"loss": _loss_over_all_positions}), DECODER),
    ("loss-mean-of-sequence-means", PatchedDecoder({"loss": _loss_per_sequence_mean}), DECODER),
    ("llama3-rope-scales-every-band", PatchedDecoder({"inv_freq": _llama3_scales_every_band}), DECODER),
    ("attention-scale-c-over-h", PatchedDecoder({"attention": _wrong_scale}), DECODER),
    ("gqa-tiled-kv-heads", PatchedDecoder({"attention": _tiled_kv}), DECODER),
    ("mask-peeks-one-ahead", PatchedDecoder({"_mask": _peeking_mask}), DECODER),
    ("window-one-key-wider", PatchedDecoder({"window": _window_one_wider}), DECODER),
    ("window-ignored", PatchedDecoder(edit=_config_edit(sliding_window=None)), DECODER),
    ("window-on-every-layer", PatchedDecoder(edit=_window_everywhere), DECODER),
    ("gemma3-norm-scales-by-w", PatchedDecoder({"gemma_rmsnorm": _gemma_scale_by_w}), DECODER),
    ("gemma3-embedding-unscaled", PatchedDecoder({"embedding_scale": lambda config: 1.0}), DECODER),
    ("gemma3-attention-scale-from-head-dim", PatchedDecoder(edit=_scale_from_head_dim), DECODER),
    ("gemma3-one-rope-for-every-layer", PatchedDecoder(edit=_same_rope_everywhere), DECODER),
    ("missing-qkv-bias", PatchedDecoder({"has_bias": _no_bias("qkv_bias")}), DECODER),
    ("missing-o-bias", PatchedDecoder({"has_bias": _no_bias("o_bias")}), DECODER),
    ("head-always-tied", PatchedDecoder(edit=_config_edit(tie_word_embeddings=True)), DECODER),
    ("gpt2-gelu-erf", PatchedDecoder({"gelu_tanh": _gelu_erf}), DECODER),
    ("gpt2-layernorm-unbiased-variance", PatchedDecoder({"layernorm": _unbiased_layernorm}), DECODER),
    ("bias-gradients-zero", ZeroBiasGrads(), DECODER),
    ("copermute-forgets-o-columns", ForgetsTheOColumns(), S2FT),
    ("gqa-query-heads-not-gathered", UngroupedHeads(), S2FT),
    ("copermute-leaves-biases", BiasesStay(), S2FT),
    ("unpermute-forgets-channels", UnpermuteForgetsChannels(), S2FT),
    ("block-grads-wrong-slice", KeepsTheWrongSlice(), S2FT),
    ("block-grads-sorted-channels", SortedChannelBlocks(), S2FT),
    ("block-grads-head-width-c-over-h", HeadWidthCOverH(), S2FT),
    ("lora-forward-unscaled", LoraForwardUnscaled(), LORA),
    ("lora-merge-unscaled", LoraMergeUnscaled(), LORA),
    ("lora-unmerge-adds", LoraUnmergeAdds(), LORA),
    ("pissa-scaling-alpha", PissaScaling(lambda alpha, r: alpha), PISSA),
    ("pissa-rslora-scaling", PissaScaling(lambda alpha, r: alpha / np.sqrt(r)), PISSA),
    ("pissa-residual-without-scaling", PissaResidualUnscaled(), PISSA),
    ("sorsa-residual-is-w", SorsaResidualIsW(), SORSA),
    ("sorsa-s-twice-forward-and-merge", SorsaSTwice(), SORSA),
    ("sorsa-regularizer-squared", SquaredRegularizer(), SORSA),
    ("sorsa-regularizer-summed", RegularizerSummed(), SORSA),
    ("sorsa-regularizer-half-gradient", RegularizerHalfGradient(), SORSA),
    ("sorsa-regularizer-wrong-gram", RegularizerWrongGram(), SORSA),
]

FAMILY_PROPERTIES = {
    DECODER: [n for n in PROPERTIES if n.startswith("decoder_")],
    S2FT: [n for n in PROPERTIES if "permute" in n or "s2ft" in n],
    LORA: [n for n in PROPERTIES if n.startswith("lora_")],
    PISSA: [n for n in PROPERTIES if n.startswith("pissa_")],
    SORSA: [n for n in PROPERTIES if n.startswith("sorsa_")],
}
FAMILY_CASES = {DECODER: ("decoder_",), S2FT: ("s2ft_",), LORA: ("lora",), PISSA: ("pissa_",),
                SORSA: ("sorsa_",)}
def test_the_mutation_suite_is_broad():
    assert len(MUTANTS) >= 25
    assert {family for _, _, family in MUTANTS} == set(FAMILY_PROPERTIES)


@pytest.mark.parametrize(("impl", "family"), [m[1:] for m in MUTANTS], ids=[m[0] for m in MUTANTS])
def test_the_spec_rejects_the_mutant(impl, family):
    failures = []
    for name in FAMILY_PROPERTIES[family]:
        try:
            PROPERTIES[name](impl)
        except AssertionError as e:
            failures.append(f"{name}: {str(e).splitlines()[0]}")
            break
    assert failures, f"no property of the {family} family rejects it"


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> Path:
    return export_vectors(tmp_path_factory.mktemp("vectors"))[0].parent


def failing_outputs(impl, root: Path, prefixes: tuple[str, ...]) -> list[str]:
    """Run the vectors' cases whose names start with ``prefixes`` through ``impl``; the checker's lines."""
    failures = []
    for folder in sorted(p.parent for p in root.glob("*/case.json")):
        if not folder.name.startswith(prefixes):
            continue
        case = json.loads((folder / "case.json").read_text())
        arrays = load_file(str(folder / "arrays.safetensors"))
        inputs = {k.removeprefix("input/"): v for k, v in arrays.items() if k.startswith("input/")}
        try:
            actual = outputs_of(impl, case, inputs)
        except Exception as e:  # a crash on a case is a rejection too
            failures.append(f"{case['name']}: raised {e!r}")
            continue
        failures += check_case(folder, actual)
    return failures


@pytest.mark.parametrize(
    ("impl", "family"),
    [m[1:] for m in MUTANTS],
    ids=[m[0] for m in MUTANTS],
)
def test_the_vectors_reject_the_mutant(impl, family, vectors):
    assert failing_outputs(impl, vectors, FAMILY_CASES[family])


def test_minift_passes_every_vector(vectors):
    assert failing_outputs(MiniftImplementation(), vectors, ("",)) == []
