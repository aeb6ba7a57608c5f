"""The one table of Hugging Face module names: where each part of a minift block lives inside a
transformers decoder layer (``model.layers.{i}.<path>`` for the Llama family and Gemma 3,
``transformer.h.{i}.<path>`` for GPT-2). ``minift.io.hub`` maps checkpoints with it, ``minift.io.peft``
and ``minift.methods.targets`` name PEFT's ``target_modules`` with it, and the bench builds its PyTorch
reference with it.
"""

from __future__ import annotations

SLOT_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
"""Slot name → module path inside a Llama/Mistral/Qwen2 decoder layer."""

LLAMA_MODULES = {
    "attn_norm": "input_layernorm",
    **{s: SLOT_MODULES[s] for s in ("q", "k", "v", "o")},
    "mlp_norm": "post_attention_layernorm",
    **{s: SLOT_MODULES[s] for s in ("gate", "up", "down")},
    "q_norm": "self_attn.q_norm",  # Qwen3's per-head query and key norms
    "k_norm": "self_attn.k_norm",
}
"""Every part of a Llama-family block → its module path."""

GEMMA3_MODULES = {
    **LLAMA_MODULES,
    "post_attn_norm": "post_attention_layernorm",  # Gemma's name for the norm of the attention output
    "mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}
"""Every part of a Gemma 3 block → its module path: four norms around attention and MLP."""

GPT2_MODULES = {
    "attn_norm": "ln_1", "o": "attn.c_proj", "mlp_norm": "ln_2", "up": "mlp.c_fc", "down": "mlp.c_proj"
}
"""Every part of a GPT-2 block → its module path; q, k, v live together in ``attn.c_attn``."""


def module_name(slot: str) -> str:
    """The short module name PEFT's ``target_modules`` use: ``q`` → ``q_proj``."""
    return SLOT_MODULES[slot].split(".")[-1]
