"""``minift spec export DIR``: the spec's canonical cases as language-agnostic test vectors.

Each case is a folder with ``arrays.safetensors`` (float64 inputs and expected outputs, computed by
minift) and ``case.json`` (the property it checks, scalars, which arrays are inputs and which are
expected outputs, and the tolerance). ``README.md`` at the top lists every case. Model weights use
Hugging Face Llama names and the ``[out, in]`` layout; tokens are int64.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from minift.spec.cases import llama_config, random_selection, random_tokens, random_weights
from minift.spec.interface import Implementation


def _matrix(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _cases(impl: Implementation) -> list[dict[str, Any]]:
    """(name, property, scalars, inputs, outputs, tolerance) of every canonical case."""
    config = llama_config(C=8, H=4, K=2, D=4, F=6, L=2, V=13)
    weights = random_weights(config, 0)
    tokens, targets = random_tokens(config, 0)
    logits = impl.decoder_logits(config, weights, tokens)
    loss, grads = impl.decoder_loss_and_grads(config, weights, tokens, targets)
    heads, channels = random_selection(config, 0, 2, 3)
    blocks = impl.s2ft_block_grads(config, weights, tokens, targets, heads, channels)
    permuted, _ = impl.copermute(config, weights, heads, channels)
    x, W, A, B = _matrix(1, (3, 5)), _matrix(2, (4, 5)), _matrix(3, (2, 5)), _matrix(4, (4, 2))
    W_res_p, A_p, B_p = impl.pissa_init(W, 2, 4.0)
    W_res_s, B_s, S_s, A_s = impl.sorsa_split(W, 2)
    reg, reg_grads = impl.sorsa_regularizer([(A, B)])
    return [
        {
            "name": "decoder_gqa",
            "property": "logits, mean cross-entropy (targets already shifted, -100 ignored) and the gradient "
            "of the loss with respect to every weight of a tiny GQA Llama (config.json in scalars)",
            "scalars": {"config": config, "loss": loss},
            "inputs": {
                "tokens": tokens,
                "targets": targets,
                **{f"weight/{k}": v for k, v in weights.items()},
            },
            "outputs": {"logits": logits, **{f"grad/{k}": v for k, v in grads.items()}},
            "rtol": 1e-10,
        },
        {
            "name": "s2ft_copermute",
            "property": "co-permuting the selected heads (per layer, query-head ids) and FFN channels leaves "
            "decoder_gqa's logits unchanged; permuted/* is one valid permutation (minift's), given so that "
            "an implementation can check its own leaves the same logits",
            "scalars": {"config": config, "heads": heads, "channels": channels},
            "inputs": {f"weight/{k}": v for k, v in weights.items()},
            "outputs": {"logits": logits, **{f"permuted/{k}": v for k, v in permuted.items()}},
            "rtol": 1e-10,
        },
        {
            "name": "s2ft_block_grads",
            "property": "partial backpropagation of S2FT on O (selected heads' input columns, in selection "
            "order) and Down (selected channels) equals the full gradient restricted to those columns",
            "scalars": {"config": config, "heads": heads, "channels": channels},
            "inputs": {
                "tokens": tokens,
                "targets": targets,
                **{f"weight/{k}": v for k, v in weights.items()},
            },
            "outputs": {f"block/{k}": v for k, v in blocks.items()},
            "rtol": 1e-10,
        },
        {
            "name": "lora",
            "property": "y = x Wᵀ + s (x Aᵀ) Bᵀ and merged = W + s B A, s = scaling",
            "scalars": {"scaling": 2.0},
            "inputs": {"x": x, "W": W, "A": A, "B": B},
            "outputs": {"y": impl.lora_forward(x, W, A, B, 2.0), "merged": impl.lora_merge(W, A, B, 2.0)},
            "rtol": 1e-12,
        },
        {
            "name": "pissa_init",
            "property": "exact-SVD PiSSA init with r = 2, alpha = 4 (scaling 2): A = diag(sqrt(σ/s)) Vᵀ, "
            "B = U diag(sqrt(σ/s)), W_res = W − s B A. Singular vectors are unique up to sign: compare "
            "W_res and B A exactly, A and B up to the sign of each rank-1 pair",
            "scalars": {"r": 2, "alpha": 4.0},
            "inputs": {"W": W},
            "outputs": {"W_res": W_res_p, "A": A_p, "B": B_p},
            "rtol": 1e-10,
        },
        {
            "name": "sorsa_split",
            "property": "SORSA split with r = 2: B = U_r, S = σ_r, A = V_rᵀ, W_res = W − B diag(S) A "
            "(A and B up to the sign of each singular pair)",
            "scalars": {"r": 2},
            "inputs": {"W": W},
            "outputs": {"W_res": W_res_s, "B": B_s, "S": S_s, "A": A_s},
            "rtol": 1e-10,
        },
        {
            "name": "sorsa_regularizer",
            "property": "L = mean(‖A Aᵀ − I‖_F, ‖Bᵀ B − I‖_F), not squared, and its gradient",
            "scalars": {"value": reg},
            "inputs": {"A": A, "B": B},
            "outputs": {"dA": reg_grads[0][0], "dB": reg_grads[0][1]},
            "rtol": 1e-10,
        },
    ]


def export_vectors(directory: str | os.PathLike[str], impl: Implementation | None = None) -> list[Path]:
    """Write every case under ``directory`` and a README that states each case's property."""
    if impl is None:
        from minift.spec.minift_impl import implementation as impl
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    written, lines = [], ["# minift spec test vectors", "", __doc__.split("\n\n", 1)[1].strip(), ""]
    for case in _cases(impl):
        folder = root / case["name"]
        folder.mkdir(exist_ok=True)
        arrays = {f"input/{k}": np.ascontiguousarray(v) for k, v in case["inputs"].items()}
        arrays |= {f"expected/{k}": np.ascontiguousarray(v) for k, v in case["outputs"].items()}
        save_file(arrays, str(folder / "arrays.safetensors"), metadata={"format": "np"})
        meta = {k: case[k] for k in ("name", "property", "scalars", "rtol")}
        meta["inputs"], meta["expected"] = sorted(case["inputs"]), sorted(case["outputs"])
        (folder / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
        lines += [f"## {case['name']}", "", case["property"] + f" (relative tolerance {case['rtol']:g}).", ""]
        written.append(folder)
    (root / "README.md").write_text("\n".join(lines))
    return written
