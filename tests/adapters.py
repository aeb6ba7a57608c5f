"""Shared helpers of the LoRA/PiSSA/SORSA/PEFT tests: a tiny float64 base model with O(1) weights, a
batch, adapter perturbation (so that trained-looking factors are tested, not only the init) and a
finite-difference check of any linear slot through its own forward/backward."""

from __future__ import annotations

import numpy as np

from minift.config import ModelConfig
from minift.model import Model, init_model, model_forward, trainable_parameters
from minift.testing import GradReport, check_grad

V = 11
TINY = ModelConfig(vocab_size=V, hidden_size=8, intermediate_size=12, n_layers=2, n_heads=2, n_kv_heads=1)


def base_model(seed: int = 0, dtype=np.float64, config: ModelConfig = TINY) -> Model:
    """A frozen tiny GQA Llama (C 8, F 12, H 2, K 1) with std-0.5 weights, far from linear."""
    return init_model(config, np.random.default_rng(seed), dtype=dtype, std=0.5)


def batch(seed: int = 0, B: int = 2, T: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def logits(model: Model, tokens: np.ndarray) -> np.ndarray:
    return model_forward(model, tokens, train=False)[0]


def perturb(model: Model, seed: int = 0, scale: float = 0.3) -> Model:
    """Add N(0, scale²) noise to every trainable array in place, as training would move them."""
    rng = np.random.default_rng(seed)
    for p in trainable_parameters(model).values():
        p += (scale * rng.standard_normal(p.shape)).astype(p.dtype)
    return model


def check_slot_grad(slot, x: np.ndarray, *, dropout_seed: int | None = None) -> GradReport:
    """check_grad of a slot's backward for its input x and every trainable array, through the slot's own
    forward (with a fixed dropout mask when ``dropout_seed`` is given)."""

    def rng():
        return None if dropout_seed is None else np.random.default_rng(dropout_seed)

    def forward(x, **_):
        return slot.forward(x, keep=True, rng=rng())[0]

    def backward(G, x, **_):
        _, cache = slot.forward(x, keep=True, rng=rng())
        dx, grads = slot.backward(G, cache)
        return {"x": dx, **grads}

    return check_grad(forward, backward, {"x": x, **slot.parameters()})
