"""minift as an implementation of the spec interface: thin glue from Hugging Face-named float64 arrays
to minift's own model, slots and methods (the default ``--impl``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from minift.io.hub import config_from_hf, from_hf_tensors, model_from_state, model_state, to_hf_tensors
from minift.methods import method_record, record_method
from minift.methods.lora import LowRankLinear
from minift.methods.pissa import pissa_factors
from minift.methods.s2ft import S2FTConfig
from minift.methods.s2ft.apply import apply_selection
from minift.methods.s2ft.permute import co_permute, expand, layouts_of, plan_layout, unpermute
from minift.methods.s2ft.slots import segment_names
from minift.methods.sorsa import factor_regularizer, sorsa_factors
from minift.model import Model, loss_and_grads, model_forward, set_trainable
from minift.spec.interface import Selection, Weights


def _model(config: dict[str, Any], weights: Weights) -> Model:
    cfg = config_from_hf(config)
    state = from_hf_tensors(cfg, {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()})
    return model_from_state(cfg, state)


def _weights(model: Model) -> Weights:
    return to_hf_tensors(model.config, model_state(model))


def _lowrank(W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float, S: np.ndarray | None = None) -> Any:
    return LowRankLinear(np.asarray(W, dtype=np.float64), A, B, scaling, S=S)


class MiniftImplementation:
    name = "minift"

    def decoder_logits(self, config: dict[str, Any], weights: Weights, tokens: np.ndarray) -> np.ndarray:
        return model_forward(_model(config, weights), tokens, train=False)[0]

    def decoder_loss_and_grads(
        self, config: dict[str, Any], weights: Weights, tokens: np.ndarray, targets: np.ndarray
    ) -> tuple[float, Weights]:
        model = set_trainable(_model(config, weights))
        loss, grads = loss_and_grads(model, tokens, targets)
        return loss, to_hf_tensors(model.config, grads)

    def copermute(
        self, config: dict[str, Any], weights: Weights, heads: Selection, channels: Selection
    ) -> tuple[Weights, Any]:
        model = _model(config, weights)
        c = model.config
        layouts = {
            i: plan_layout(tuple(heads[i]), tuple(channels[i]), c.n_heads, c.n_kv_heads, c.intermediate_size)
            for i in heads
        }
        co_permute(model, layouts)
        return _weights(model), method_record(model)

    def unpermute(self, config: dict[str, Any], weights: Weights, state: Any) -> Weights:
        model = _model(config, weights)
        record_method(model, state)
        return _weights(unpermute(model))

    def s2ft_block_grads(
        self,
        config: dict[str, Any],
        weights: Weights,
        tokens: np.ndarray,
        targets: np.ndarray,
        heads: Selection,
        channels: Selection,
    ) -> Weights:
        model = _model(config, weights)
        c = model.config
        s2 = S2FTConfig(heads=len(heads[0]), channels=len(channels[0]))
        apply_selection(model, s2, {i: (tuple(heads[i]), tuple(channels[i])) for i in heads})
        _, grads = loss_and_grads(model, tokens, targets)
        out: Weights = {}
        for i, layout in layouts_of(model).items():
            block = model.blocks[i]
            for name, units, order, width, hf in (
                ("o", heads[i], layout.head_order, c.head_dim, "self_attn.o_proj"),
                ("down", channels[i], layout.channel_order, 1, "mlp.down_proj"),
            ):
                slot = getattr(block, name)
                # the block gradients, concatenated in segment order, cover these permuted columns:
                cols = [j for a, b in slot.segments for j in range(a, b)]
                g = np.concatenate(
                    [grads[f"blocks.{i}.{name}.{n}"] for n in segment_names(slot.segments)], axis=1
                )
                original = expand(order, width)  # permuted column j holds original column original[j]
                where = {original[j]: k for k, j in enumerate(cols)}
                out[f"model.layers.{i}.{hf}.weight"] = g[
                    :, [where[col] for col in expand(tuple(units), width)]
                ]
        return out

    def lora_forward(
        self, x: np.ndarray, W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float
    ) -> np.ndarray:
        return _lowrank(W, A, B, scaling).forward(x, keep=False)[0]

    def lora_merge(self, W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
        slot = _lowrank(W, A, B, scaling)
        slot.merge()
        return slot.weight

    def lora_unmerge(self, W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
        slot = _lowrank(W, A, B, scaling)
        slot.merged = True
        slot.unmerge()
        return slot.weight

    def pissa_init(self, W: np.ndarray, r: int, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        A, B, W_res = pissa_factors(np.asarray(W, dtype=np.float64), r, alpha / r)
        return W_res, A, B

    def sorsa_split(self, W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        A, S, B, W_res = sorsa_factors(np.asarray(W, dtype=np.float64), r, 1.0)
        return W_res, B, S, A

    def sorsa_forward(
        self, x: np.ndarray, W_res: np.ndarray, B: np.ndarray, S: np.ndarray, A: np.ndarray
    ) -> np.ndarray:
        return _lowrank(W_res, A, B, 1.0, S).forward(x, keep=False)[0]

    def sorsa_merge(self, W_res: np.ndarray, B: np.ndarray, S: np.ndarray, A: np.ndarray) -> np.ndarray:
        slot = _lowrank(W_res, A, B, 1.0, S)
        slot.merge()
        return slot.weight

    def sorsa_regularizer(
        self, factors: list[tuple[np.ndarray, np.ndarray]]
    ) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        return factor_regularizer(factors)


implementation = MiniftImplementation()
