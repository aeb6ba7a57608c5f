"""Deliberately broken implementations of the spec interface: each must fail the spec, readably."""

from __future__ import annotations

import numpy as np

from minift.spec.minift_impl import MiniftImplementation


class ForgetsTheOColumns(MiniftImplementation):
    """Co-permutes Q/K/V rows but leaves O's input columns where they were."""

    def copermute(self, config, weights, heads, channels):
        permuted, state = super().copermute(config, weights, heads, channels)
        for i in range(config["num_hidden_layers"]):
            key = f"model.layers.{i}.self_attn.o_proj.weight"
            permuted[key] = weights[key]
        return permuted, state


class SquaredRegularizer(MiniftImplementation):
    """Uses ‖·‖_F² instead of SORSA's plain Frobenius norm."""

    def sorsa_regularizer(self, factors):
        terms = [np.sum((A @ A.T - np.eye(len(A))) ** 2) for A, _ in factors]
        terms += [np.sum((B.T @ B - np.eye(B.shape[1])) ** 2) for _, B in factors]
        w = 1.0 / len(terms)
        grads = [
            (4 * w * (A @ A.T - np.eye(len(A))) @ A, 4 * w * B @ (B.T @ B - np.eye(B.shape[1])))
            for A, B in factors
        ]
        return float(np.mean(terms)), grads


class KeepsTheWrongSlice(MiniftImplementation):
    """S2FT's input-column block gradient from the last S columns of x instead of the selected ones."""

    def s2ft_block_grads(self, config, weights, tokens, targets, heads, channels):
        _, full = self.decoder_loss_and_grads(config, weights, tokens, targets)
        out = {}
        D = config["head_dim"]
        for i in range(config["num_hidden_layers"]):
            o = f"model.layers.{i}.self_attn.o_proj.weight"
            out[o] = full[o][:, full[o].shape[1] - len(heads[i]) * D :]
            d = f"model.layers.{i}.mlp.down_proj.weight"
            out[d] = full[d][:, full[d].shape[1] - len(channels[i]) :]
        return out
