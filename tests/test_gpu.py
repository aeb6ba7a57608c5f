"""The GPU path: the same model and methods on CuPy give the host's numbers.

Logits and every gradient on the GPU equal the NumPy host result (float32: ≤ 1e-4 relative, normwise
per array; float64: ≤ 1e-10); a few training steps of every method give the host's losses within
float32 noise; the spec holds for minift running on CuPy. Skipped where CuPy or a GPU is missing.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from minift.backend import gpu_available, to_numpy
from minift.device import to_device
from minift.io.hub import config_from_hf, from_hf_tensors, model_from_state, to_hf_tensors
from minift.model import loss_and_grads, model_forward, set_trainable, trainable_parameters
from minift.optim import AdamW
from minift.spec.minift_impl import MiniftImplementation
from minift.spec.properties import PROPERTIES
from minift.tools.bench import QUICK, batch, prepare_model
from minift.train import train_step
from tests.toy import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU"),
]

# float32 on two devices differs by reduction order only; float64 by rounding
TOLERANCE = {np.float32: 1e-4, np.float64: 1e-10}


def relative_error(a: Any, b: Any, scale: float = 0.0) -> float:
    """‖a − b‖ / max(‖b‖, scale): normwise, and against ``scale`` where b is (near) zero."""
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), scale, 1e-300))


ARCHS = {  # tiny_model overrides: each family's own layers (Qwen3 and Gemma 3 with sliding windows)
    "llama": {"head_dim": 12},
    "gpt2": {"arch": "gpt2", "n_kv_heads": 4, "qkv_bias": True, "o_bias": True, "mlp_bias": True,
             "max_position_embeddings": 16},
    "qwen3": {"qk_norm": True, "head_dim": 12, "sliding_window": 4, "layer_types": ("full_attention",
              "sliding_attention")},
    "gemma3": {"arch": "gemma3", "qk_norm": True, "head_dim": 12, "tie_word_embeddings": True,
               "query_pre_attn_scalar": 10.0, "rope_local_theta": 20.0, "sliding_window": 4,
               "layer_types": ("sliding_attention", "full_attention")},
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_and_every_gradient_on_the_gpu_equal_the_host_results(dtype, arch):
    import cupy

    host = tiny_model(50, seed=1, dtype=dtype, std=0.3, **ARCHS[arch])
    gpu = to_device(copy.deepcopy(host), "cuda")
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, 50, (2, 9)), rng.integers(0, 50, (2, 9))
    targets[0, :3] = -100  # ignored positions take the same path on both devices

    logits_host, _ = model_forward(host, tokens, train=False)
    logits_gpu, _ = model_forward(gpu, cupy.asarray(tokens), train=False)
    assert isinstance(logits_gpu, cupy.ndarray)
    assert relative_error(logits_gpu, logits_host) <= TOLERANCE[dtype]

    loss_host, grads_host = loss_and_grads(host, tokens, targets)
    loss_gpu, grads_gpu = loss_and_grads(gpu, cupy.asarray(tokens), cupy.asarray(targets))
    assert abs(loss_gpu - loss_host) <= TOLERANCE[dtype] * abs(loss_host)
    assert grads_gpu.keys() == grads_host.keys() == trainable_parameters(host).keys()
    # an array whose exact gradient is zero (the key bias: it shifts a whole row of scores, which the
    # softmax ignores) holds rounding noise on both devices: measure it against the largest gradient
    scale = 1e-3 * max(float(np.linalg.norm(g)) for g in grads_host.values())
    for name, g in grads_host.items():
        assert isinstance(grads_gpu[name], cupy.ndarray), name
        assert relative_error(grads_gpu[name], g, scale) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", ["full", "lora", "pissa", "sorsa", "s2ft"])
def test_training_steps_of_every_method_on_the_gpu_give_the_host_losses(method, checkpointing):
    """S2FT's MLP takes the lean path (gate and up frozen), with and without activation checkpointing."""
    host, hooks = prepare_model(method, QUICK, seed=0)
    gpu = to_device(copy.deepcopy(host), "cuda")
    micro_batches = [batch(QUICK, seed=0)]
    losses = []
    for model in (host, gpu):
        opt = AdamW(trainable_parameters(model))
        losses.append([
            train_step(model, opt, micro_batches, 1e-3, grad_hooks=hooks,
                       activation_checkpointing=checkpointing).loss
            for _ in range(4)
        ])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    assert losses[0][-1] < losses[0][0]  # the steps did train


class MiniftOnTheGPU(MiniftImplementation):
    """minift's spec implementation with the decoder computed on the GPU: weights arrive as host
    arrays, the model is moved to CuPy, results come back as host arrays."""

    name = "minift-cupy"

    @staticmethod
    def _gpu_model(config: dict[str, Any], weights: dict[str, np.ndarray]):
        import cupy

        cfg = config_from_hf(config)
        state = from_hf_tensors(cfg, {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()})
        return model_from_state(cfg, state, xp=cupy)

    def decoder_logits(self, config, weights, tokens):
        import cupy

        return to_numpy(model_forward(self._gpu_model(config, weights), cupy.asarray(tokens), train=False)[0])

    def decoder_loss_and_grads(self, config, weights, tokens, targets):
        import cupy

        model = set_trainable(self._gpu_model(config, weights))
        loss, grads = loss_and_grads(model, cupy.asarray(tokens), cupy.asarray(targets))
        return loss, to_hf_tensors(model.config, {k: to_numpy(g) for k, g in grads.items()})


@pytest.mark.parametrize("name", [n for n in PROPERTIES if n.startswith("decoder")])
def test_minift_on_the_gpu_satisfies_the_decoder_spec(name):
    PROPERTIES[name](MiniftOnTheGPU())
