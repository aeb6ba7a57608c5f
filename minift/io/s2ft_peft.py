"""An S2FT adapter as an exact PEFT LoRA adapter, loadable by PEFT and any LoRA serving stack.

An S2FT update touches S selected columns (O, Down: the inputs of whole heads or channels) or rows
(Q, K, V, Gate, Up: their outputs) of a weight W (O, I), so it is exactly a rank-S product
(paper Sec. 6.2: ΔW = U Vᵀ with U a selector):

    columns idx:  ΔW = ΔW[:, idx] E_idx     lora_B = ΔW[:, idx] (O, S)   lora_A = E_idx = I_I[idx, :] (S, I)
    rows idx:     ΔW = E_idxᵀ ΔW[idx, :]    lora_B = I_O[:, idx] (O, S)   lora_A = ΔW[idx, :]          (S, I)

E_idx holds the rows of the identity that select idx (one 1 per row), so lora_B lora_A reproduces ΔW
bit for bit: each entry is one product with 1.0 plus zeros. K and V rows of a GQA model are rows of
their own (smaller) weights and go the same way. S varies per module, so the config names every
module in ``target_modules`` and gives its rank in ``rank_pattern`` and ``alpha_pattern`` with
alpha = rank: PEFT's scaling alpha/r is exactly 1.

Cost at serving time: a LoRA stack computes x A (S·I multiply-adds per token) then (xA) B (O·S)
for every adapted module, although A (or B) is a one-hot selector: (I + O)·S extra multiply-adds and
parameters per module, where S2FT's own switch adds nothing to the forward pass (the delta is
scattered into W once: O·S or S·I additions).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from minift.backend import get_xp, to_numpy
from minift.errors import ConfigError
from minift.io.atomic import replace_folder
from minift.io.peft import CONFIG_NAME, WEIGHTS_NAME, hf_module, peft_key
from minift.io.safetensors_io import write_safetensors
from minift.methods.s2ft.adapter import S2FTAdapter


def lora_form(axis: str, indices: np.ndarray, delta: np.ndarray, shape: tuple[int, int]) -> tuple[
    np.ndarray, np.ndarray
]:
    """(lora_A (S, I), lora_B (O, S)) with lora_B @ lora_A = the block's ΔW (module docstring).

    Shapes:
        indices (S,); delta (O, S) for columns, (S, I) for rows; shape (O, I)
    """
    xp = get_xp(delta)
    O, I = shape
    S = len(indices)
    selector = xp.zeros((S, I if axis == "columns" else O), dtype=delta.dtype)
    selector[xp.arange(S), xp.asarray(indices)] = 1.0
    if axis == "columns":
        return selector, delta
    return delta, xp.ascontiguousarray(selector.T)


def peft_lora_from_s2ft(adapter: S2FTAdapter) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """The tensors and ``adapter_config.json`` of the exact PEFT LoRA form of ``adapter``."""
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for key, blk in sorted(adapter.blocks.items()):
        _, layer, name = key.split(".")
        indices = to_numpy(blk.indices).astype(np.int64)
        if not len(indices):
            continue
        A, B = lora_form(blk.axis, indices, to_numpy(blk.delta).astype(np.float32), blk.shape)
        tensors[peft_key(int(layer), name, "A")] = A
        tensors[peft_key(int(layer), name, "B")] = B
        ranks[hf_module(int(layer), name)] = len(indices)
    if not ranks:
        raise ConfigError("the S2FT adapter selects no rows or columns: nothing to export")
    r = Counter(ranks.values()).most_common(1)[0][0]  # the default; every module also has its pattern
    config: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "",
        "r": r,
        "lora_alpha": float(r),
        "lora_dropout": 0.0,
        "use_rslora": False,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: s for m, s in ranks.items() if s != r},
        "alpha_pattern": {m: float(s) for m, s in ranks.items() if s != r},
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
    }
    return tensors, config


def export_s2ft_as_peft(
    adapter: S2FTAdapter, folder: str | Path, *, base_model_name_or_path: str = ""
) -> Path:
    """Write the PEFT LoRA form of an S2FT adapter into ``folder``, swapped in whole
    (``minift.io.atomic.replace_folder``): an interrupted export leaves an existing folder as it was."""
    tensors, config = peft_lora_from_s2ft(adapter)
    config["base_model_name_or_path"] = base_model_name_or_path
    with replace_folder(folder) as tmp:
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(folder)
