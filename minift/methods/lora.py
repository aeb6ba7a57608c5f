"""LoRA (Hu et al. 2021, arXiv 2106.09685, eq. 3) with Hugging Face PEFT's conventions, on the
low-rank slot of ``minift.methods.lowrank`` (which LoRA, PiSSA and SORSA share).

    y = x Wᵀ + b + s · ((drop(x) Aᵀ) ⊙ S) Bᵀ

with W and b frozen, A (R, I) and B (O, R) trainable, S (R,) SORSA's trainable singular values
(S ≡ 1 for LoRA and PiSSA) and the scaling s = alpha / R (rsLoRA: alpha / √R). As in PEFT
(``LoraConfig``, ``reset_lora_parameters``): A ~ kaiming_uniform(a=√5) = U(−1/√I, 1/√I), B = 0, so the
adapted model starts as the base model; dropout acts on the adapter's input only.

The factored form never builds the (O, I) matrix B diag(S) A; the backward is the forward reversed:

    h = x_d Aᵀ,  g = h ⊙ S,  y = x Wᵀ + s g Bᵀ                      (x_d = drop(x))
    dB = s dyᵀ g,  dg = s dy B,  dS = Σ_n dg ⊙ h,  dh = dg ⊙ S,  dA = dhᵀ x_d
    dx = dy W + (dh A) ⊙ mask / (1 − p)

Merging folds the delta into the frozen weight, W ← W + s B diag(S) A, after which the slot is a plain
linear layer; unmerging subtracts it again (PEFT ``merge``/``unmerge``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from minift.backend import get_xp
from minift.methods import MethodRecord, record_method
from minift.methods.lowrank import (
    LowRankCache,
    LowRankLinear,
    check_adapter_config,
    low_rank_slots,
    lowrank_backward,
    lowrank_forward,
    merge,
    require_dense,
    unmerge,
)
from minift.methods.targets import freeze, replace_slot, select_targets
from minift.model import Model

__all__ = [  # the slot's names stay importable from here, where LoRA introduces them
    "LoRAConfig",
    "LowRankCache",
    "LowRankLinear",
    "apply_lora",
    "low_rank_slots",
    "lowrank_backward",
    "lowrank_forward",
    "merge",
    "unmerge",
]


# ----------------------------------------------------------------------------------------------------
# the method


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyperparameters, named and defaulted as PEFT's ``LoraConfig``."""

    r: int = 8  # R, the adapter rank
    alpha: float = 8.0  # lora_alpha: scaling = alpha / r, or alpha / √r with rsLoRA
    dropout: float = 0.0  # lora_dropout, on the adapter input only
    use_rslora: bool = False  # rank-stabilised scaling alpha / √r (Kalajdzievski 2023)
    targets: tuple[str, ...] = ("q", "v")  # PEFT's default for Llama-family models
    layers: tuple[int, ...] | None = None  # layers_to_transform; None = all

    def __post_init__(self) -> None:
        check_adapter_config(self)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def apply_lora(
    model: Model, config: LoRAConfig | None = None, rng: np.random.Generator | None = None
) -> Model:
    """Freeze the model and put a LoRA adapter on every target (in place; returns the model).

    A ~ U(−1/√I, 1/√I) from ``rng`` (PEFT's kaiming_uniform(a=√5)), B = 0: the output is unchanged.
    """
    config = config or LoRAConfig()
    rng = rng if rng is not None else np.random.default_rng(0)
    freeze(model)
    for i, name, slot in select_targets(model, config.targets, config.layers):
        dense = require_dense(slot, i, name)
        w = dense.weight
        xp = get_xp(w)
        n_out, n_in = w.shape
        bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform(a=√5): gain √(1/3), bound √3·gain/√fan_in
        A = xp.asarray(rng.uniform(-bound, bound, size=(config.r, n_in)).astype(w.dtype))
        B = xp.zeros((n_out, config.r), dtype=w.dtype)
        replace_slot(model, i, name, LowRankLinear(w, A, B, config.scaling, bias=dense.bias,
                                                   dropout=config.dropout))
    record_method(model, MethodRecord("lora", config))
    return model


Config = LoRAConfig
apply = apply_lora
