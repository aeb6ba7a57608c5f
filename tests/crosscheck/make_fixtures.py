"""Tiny random transformers models as the outside oracle, and the committed fixtures made from them.

Run ``python tests/crosscheck/make_fixtures.py`` (needs the ``crosscheck`` extra: torch, transformers) to
rewrite ``tests/crosscheck/fixtures/``. Each fixture folder is a checkpoint written by transformers'
own ``save_pretrained`` plus ``expected.safetensors``, everything transformers computed on it: the
input batch, logits, loss and the gradient of every parameter (by Hugging Face name). minift never
writes a golden value; ``test_fixtures.py`` compares against these without importing torch.

The builders here are shared with ``test_against_transformers.py``. Recipe: eager
attention, float32, and every parameter randomised: N(0, 0.2²) for weights and biases, N(1, 0.2²) for
norm weights, since the default init (unit norms, zero biases) would hide a misapplied norm or bias.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import transformers

FIXTURES = Path(__file__).parent / "fixtures"
VOCAB = 64

# name → (config class, model class, config kwargs): the configurations the issue asks for.
SPECS: dict[str, tuple[str, str, dict]] = {
    "llama_gqa_llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),  # small, so all three bands occur at D=8
    "llama_bias_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1e6)),
    "mistral_head_dim": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, sliding_window=None)),
    # Sliding windows (4) shorter than the test batch (9 tokens): Mistral's on every layer, Qwen3's on the
    # layers from max_window_layers on, beside Qwen3's per-head q/k norms.
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4)),
    "qwen3_window": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    # Gemma 3: sliding (window 4) and global layers mixed, each kind with its own RoPE (the global one
    # linearly scaled), head_dim 12 ≠ C/H = 8, query_pre_attn_scalar 10 ≠ head_dim, tied embeddings.
    "gemma3_window": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=10, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=40)),
}
# Committed fixtures: the llama3/GQA model stored in bf16 (exercising the bf16 reader against torch's
# own bf16 writer) and GPT-2 in float32 (Conv1D layout, fused c_attn, tied head, learned positions).
FIXTURE_SPECS = {"llama_gqa_llama3": torch.bfloat16, "gpt2": torch.float32}


def build_hf_model(name: str, seed: int = 0, *, vocab: int = VOCAB) -> torch.nn.Module:
    """A tiny transformers model of the named spec, every parameter random, eager attention, float32."""
    config_cls, model_cls, kwargs = SPECS[name]
    config = getattr(transformers, config_cls)(vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                                               attn_implementation="eager", **kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():  # de-duplicates tied weights
            is_norm_weight = pname.endswith("weight") and p.ndim == 1
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if is_norm_weight else 0.0))
    return model


def batch(seed: int = 0, *, B: int = 2, T: int = 9, pad: int = 3) -> dict[str, np.ndarray]:
    """A left-padded batch (row 1 has ``pad`` padding tokens) with HF-style unshifted labels.

    positions = cumsum(mask) − 1 (what minift and HF generation use); labels are −100 on padding and
    on each row's first real token, which HF would otherwise predict from a padding position.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, size=(B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, :pad] = 0
    tokens[1, :pad] = 0
    labels = np.where(mask == 1, tokens, -100)
    labels[np.arange(B), np.argmax(mask, axis=1)] = -100
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return {"tokens": tokens, "attention_mask": mask, "position_ids": positions, "labels": labels}


def minift_targets(labels: np.ndarray) -> np.ndarray:
    """HF shifts labels inside the loss; minift takes targets[b, t] = the token after position t."""
    return np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), -100)], axis=1)


def hf_reference(model: torch.nn.Module, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' logits, loss and every parameter's gradient (``grad.<HF name>``) on one batch."""
    model.zero_grad()
    out = model(input_ids=torch.tensor(data["tokens"]), attention_mask=torch.tensor(data["attention_mask"]),
                position_ids=torch.tensor(data["position_ids"]), labels=torch.tensor(data["labels"]))
    out.loss.backward()
    ref = {"logits": out.logits.detach().numpy(), "loss": out.loss.detach().numpy()}
    for pname, p in model.named_parameters():
        ref[f"grad.{pname}"] = p.grad.numpy().copy()
    return ref


def hf_greedy(model: torch.nn.Module, prompt: np.ndarray, n: int) -> list[int]:
    """transformers' greedy continuation by ``n`` tokens, never stopping early."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ids = torch.tensor(prompt)[None]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_fixture(name: str, dtype: torch.dtype, folder: Path) -> None:
    """Write one fixture folder: the checkpoint as transformers saves it, and its expected values."""
    from safetensors.numpy import save_file

    model = build_hf_model(name)
    with torch.no_grad():  # round the weights first, so the reference is computed on what is stored
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    data = batch()
    ref = hf_reference(model, data)
    model.to(dtype).save_pretrained(folder)
    expected = {k: np.array(v, order="C") for k, v in (data | ref).items()}  # keeps 0-d loss 0-d
    save_file(expected, str(folder / "expected.safetensors"), metadata={
        "transformers": transformers.__version__, "torch": torch.__version__})


def main() -> int:
    for name, dtype in FIXTURE_SPECS.items():
        make_fixture(name, dtype, FIXTURES / name)
        size = sum(f.stat().st_size for f in (FIXTURES / name).iterdir())
        print(f"{FIXTURES / name}: {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
