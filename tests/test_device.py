"""Moving a model between host and GPU: the CPU half of the contract runs everywhere, the GPU half
runs (unchanged) where CuPy sees a device."""

import numpy as np
import pytest

from minift.backend import gpu_available
from minift.config import ModelConfig
from minift.device import device_of, to_device
from minift.errors import ConfigError
from minift.model import init_model, model_forward

CFG = ModelConfig(vocab_size=13, hidden_size=8, intermediate_size=12, n_layers=2, n_heads=4, n_kv_heads=2)


def test_moving_to_the_cpu_keeps_every_weight_and_the_logits():
    model = init_model(CFG, np.random.default_rng(0))
    tokens = np.arange(10).reshape(2, 5)
    before, _ = model_forward(model, tokens, train=False)
    assert device_of(to_device(model, "cpu")) == "cpu"
    after, _ = model_forward(model, tokens, train=False)
    np.testing.assert_array_equal(before, after)


def test_an_unknown_device_is_a_clear_error():
    model = init_model(CFG, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        to_device(model, "tpu")


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_says_what_is_missing():
    with pytest.raises(ConfigError, match="needs CuPy and a CUDA GPU"):
        to_device(init_model(CFG, np.random.default_rng(0)), "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_the_same_model_on_the_gpu_gives_the_host_logits_within_float32_tolerance():
    import cupy

    model = init_model(CFG, np.random.default_rng(0))
    tokens = np.arange(10).reshape(2, 5)
    host, _ = model_forward(model, tokens, train=False)
    to_device(model, "cuda")
    gpu, _ = model_forward(model, cupy.asarray(tokens), train=False)
    assert isinstance(gpu, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(gpu), host, rtol=1e-4, atol=1e-5)
