"""``minift spec export DIR``: the spec's canonical cases as language-agnostic test vectors (v2).

Each case is a folder with ``arrays.safetensors`` and ``case.json``, self-contained: its own config,
tokens, weights and scalars. Arrays are float64 (tokens and targets int64), inputs under ``input/``,
expected outputs under ``expected/`` (a scalar as shape (1,)). ``case.json`` states the property,
the interface call that produces each output (``minift.spec.interface``), the scalars (a Hugging Face
``config.json`` dict, S2FT selections as one list per layer, ranks, scalings) and, per output, the
tolerance: the output passes when |actual − expected| ≤ atol + rtol · |expected| elementwise. Model
weights use Hugging Face names and layouts (``[out, in]``; GPT-2's Conv1D ``[in, out]``).

How the expected outputs were computed, all in float64:

- logits and losses: ``minift.spec.reference``, the spec's plain decoder, with float64 RoPE tables
  ``inv_freq[j] = 1 / θ^(2j/D)`` (rescaled per ``rope_scaling``) and angles ``t · inv_freq[j]``;
- gradients (full and S2FT block): minift's analytic backward, whose RoPE tables are float32 as
  Hugging Face builds them; they differ from a float64-table gradient by about 1e-8 normwise (1e-7 of
  the largest entry at worst), inside the stated tolerance (atol = 1e-5 · max |expected|, rtol = 1e-5);
  logits and losses have rtol = 1e-6, atol = 1e-6 · max |expected|;
- LoRA, PiSSA and SORSA: their formulas in NumPy (SVD by LAPACK). Singular vectors are unique only up
  to sign, so those cases give sign-free products (B A, A Aᵀ, Bᵀ B) rather than the factors.

``check.py``, written beside the cases, is a standalone checker (NumPy + safetensors): write your
outputs into ``<case>/actual.safetensors`` under the expected names and run ``python check.py DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from minift.spec import reference
from minift.spec.cases import LLAMA3, gemma3_config, gpt2_config, llama_config, random_tokens, random_weights
from minift.spec.interface import Guarded, Implementation, Selection

# Constants far from their usual values, so that an implementation hard-coding them fails.
MHA = llama_config(C=8, H=2, K=2, D=6, F=6, L=2, V=13, eps=0.05, theta=50.0, bias=True,
                   rope_scaling={"rope_type": "linear", "factor": 3.0})
GQA = llama_config(C=8, H=4, K=2, D=6, F=10, L=2, V=13, model_type="qwen2", eps=0.3, theta=500.0,
                   rope_scaling=LLAMA3, tie=True)
GPT2 = gpt2_config(C=8, H=2, L=2, V=13, eps=0.1)
# q/k norms and a window of 2 (under the 6 tokens) on the second layer only; Gemma 3 with its window on
# the first layer, the other one global with a scaled RoPE of its own base.
QWEN3 = llama_config(C=8, H=4, K=2, D=6, F=10, L=2, V=13, model_type="qwen3", eps=0.05, theta=500.0,
                     bias=True, window=2, sliding=(False, True))
GEMMA3 = gemma3_config(C=8, H=4, K=2, D=6, F=10, V=13, eps=0.05, theta=500.0, local_theta=20.0, scalar=3.0,
                       window=2, sliding=(True, False), rope_scaling={"rope_type": "linear", "factor": 3.0})
# GQA selections (G = 2): layer 0 splits both kv groups with heads 0 and 3, which only a layout that
# gathers heads inside their group makes one segment; layer 1 takes kv group 1 whole. Either selection
# has exactly one layout in the documented minimal form, so its pattern of selected heads is a vector.
SELECTIONS = {"mha": ([[1], [0, 1]], [[4, 0], [2]]), "gqa": ([[3, 0], [3, 2]], [[7, 2, 5], [0]])}

EXACT = {"rtol": 0.0, "atol": 0.0}
GRAD_REL = 1e-5  # gradients come from minift (float32 RoPE tables): ~1e-7 of the largest entry at worst


def _matrix(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _loose(a: np.ndarray, rel: float = 1e-6) -> dict[str, float]:
    """rtol = rel, atol = rel · max |a|: what a result of roundoff-level differences passes."""
    return {"rtol": rel, "atol": rel * float(np.max(np.abs(a), initial=0.0))}


def _tight(a: np.ndarray) -> dict[str, float]:
    return _loose(a, 1e-10)


def selection(lists: list[list[int]]) -> Selection:
    """A selection stored as one list per layer → the interface's {layer: ids}."""
    return {i: list(ids) for i, ids in enumerate(lists)}


def _weights_in(config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    return {f"weight/{k}": v for k, v in random_weights(config, seed).items()}


def _decoder_case(impl: Implementation, tag: str, config: dict[str, Any], seed: int) -> dict[str, Any]:
    weights = random_weights(config, seed)
    tokens, targets = random_tokens(config, seed)
    logits = reference.logits(config, weights, tokens)
    loss = np.array([reference.loss(config, weights, tokens, targets)])
    _, grads = impl.decoder_loss_and_grads(config, weights, tokens, targets)
    outputs = {"logits": logits, "loss": loss, **{f"grad/{k}": g for k, g in grads.items()}}
    return {
        "name": f"decoder_{tag}",
        "property": f"the {config['model_type']} decoder ({tag}) as minift.spec.reference defines it: "
        "logits, "
        "the mean cross-entropy over targets that are not -100 (targets already shifted), and its "
        "gradient with respect to every weight",
        "call": "logits = decoder_logits(config, weight/*, tokens); loss, grad/* = "
        "decoder_loss_and_grads(config, weight/*, tokens, targets)",
        "scalars": {"config": config},
        "inputs": {"tokens": tokens, "targets": targets, **{f"weight/{k}": v for k, v in weights.items()}},
        "outputs": outputs,
        "tolerance": {"logits": _loose(logits), "loss": _loose(loss)}
        | {k: _loose(v, GRAD_REL) for k, v in outputs.items() if k.startswith("grad/")},
    }


def _causal_case(config: dict[str, Any], seed: int, t: int) -> dict[str, Any]:
    weights = random_weights(config, seed)
    tokens, _ = random_tokens(config, seed)
    changed = tokens.copy()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 3) % config["vocab_size"]
    a, b = reference.logits(config, weights, tokens), reference.logits(config, weights, changed)
    return {
        "name": "decoder_causality",
        "property": f"changing the tokens after position {t} changes no logit at positions ≤ {t}: "
        f"prefix_changed equals prefix (logits[:, :{t + 1}] of each)",
        "call": f"prefix = decoder_logits(config, weight/*, tokens)[:, :{t + 1}]; prefix_changed = the same "
        "for tokens_changed",
        "scalars": {"config": config, "t": t},
        "inputs": {"tokens": tokens, "tokens_changed": changed,
                   **{f"weight/{k}": v for k, v in weights.items()}},
        "outputs": {"prefix": a[:, : t + 1], "prefix_changed": b[:, : t + 1]},
        "tolerance": {"prefix": _loose(a), "prefix_changed": _loose(a)},
    }


def _s2ft_cases(impl: Implementation, tag: str, config: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    weights = random_weights(config, seed)
    tokens, targets = random_tokens(config, seed)
    head_lists, channel_lists = SELECTIONS[tag]
    heads, channels = selection(head_lists), selection(channel_lists)
    logits = reference.logits(config, weights, tokens)
    blocks = impl.s2ft_block_grads(config, weights, tokens, targets, heads, channels)
    scalars = {"config": config, "heads": head_lists, "channels": channel_lists}
    w_in = {f"weight/{k}": v for k, v in weights.items()}
    return [
        {
            "name": f"s2ft_copermute_{tag}",
            "property": "co-permuting the selected query heads and FFN channels (one list per layer) is a "
            "change of coordinates: the permuted model's logits equal the original's, and unpermute "
            "restores every weight bit for bit; selected_at/<layer>[j] is 1 where the query head at "
            "permuted position j is a selected one, else 0: the documented minimal layout "
            "(minift.spec.interface), unique for these selections",
            "call": "permuted, state = copermute(config, weight/*, heads, channels); logits = "
            "decoder_logits(config, permuted, tokens); restored/* = unpermute(config, permuted, state); "
            "selected_at/<layer> from matching permuted q_proj row blocks to the original heads",
            "scalars": scalars,
            "inputs": {"tokens": tokens, **w_in},
            "outputs": {"logits": logits, **{f"restored/{k}": v for k, v in weights.items()}}
            | {f"selected_at/{i}": v for i, v in enumerate(_selected_at(config, head_lists))},
            "tolerance": {"logits": _loose(logits)} | {f"restored/{k}": EXACT for k in weights}
            | {f"selected_at/{i}": EXACT for i in range(len(head_lists))},
        },
        {
            "name": f"s2ft_block_grads_{tag}",
            "property": "S2FT's partial backpropagation on O (the selected heads' input columns, in "
            "selection "
            "order) and Down (the selected channels, in selection order) equals the full gradient "
            "restricted to those columns",
            "call": "block/* = s2ft_block_grads(config, weight/*, tokens, targets, heads, channels)",
            "scalars": scalars,
            "inputs": {"tokens": tokens, "targets": targets, **w_in},
            "outputs": {f"block/{k}": v for k, v in blocks.items()},
            "tolerance": {f"block/{k}": _loose(v, GRAD_REL) for k, v in blocks.items()},
        },
    ]


def _selected_at(config: dict[str, Any], head_lists: list[list[int]]) -> list[np.ndarray]:
    """Per layer, (H,) flags of the documented minimal layout: groups ordered partial₀, full…,
    partial₁, …, empty…, selected heads last inside partial₀, partial₂, … and first elsewhere."""
    H, K = config["num_attention_heads"], config["num_key_value_heads"]
    G, out = H // K, []
    for selected in head_lists:
        count = [sum(h // G == g for h in selected) for g in range(K)]
        partial = [g for g in range(K) if 0 < count[g] < G]
        groups = partial[:1] + [g for g in range(K) if count[g] == G] + partial[1:]
        flags = []
        for g in groups + [g for g in range(K) if count[g] == 0]:
            sel = [1.0] * count[g]
            rest = [0.0] * (G - count[g])
            flags += rest + sel if g in partial[0::2] else sel + rest
        out.append(np.array(flags))
    return out


def _lowrank_cases() -> list[dict[str, Any]]:
    x, W, A, B = _matrix(1, (3, 5)), _matrix(2, (4, 5)), _matrix(3, (2, 5)), _matrix(4, (4, 2))
    s = 2.5
    lora = {"y": x @ W.T + s * (x @ A.T) @ B.T, "merged": W + s * B @ A, "unmerged": W - s * B @ A}
    r, alpha = 2, 16.0
    U, sigma, Vt = np.linalg.svd(W, full_matrices=False)
    top = (U[:, :r] * sigma[:r]) @ Vt[:r]
    ps = alpha / r
    pissa = {"W_res": W - top, "BA": top / ps, "AAt": np.diag(sigma[:r] / ps), "BtB": np.diag(sigma[:r] / ps)}
    sorsa = {"W_res": W - top, "S": sigma[:r], "BSA": top, "AAt": np.eye(r), "BtB": np.eye(r)}
    Wr, Bs, Ss, As = _matrix(5, (4, 5)), _matrix(6, (4, 2)), np.array([1.5, 0.7]), _matrix(7, (2, 5))
    sorsa_fm = {"y": x @ Wr.T + ((x @ As.T) * Ss) @ Bs.T, "merged": Wr + Bs @ np.diag(Ss) @ As}
    factors = [(_matrix(8, (2, 5)), _matrix(9, (4, 2))), (_matrix(10, (3, 4)), _matrix(11, (6, 3)))]
    n = 2 * len(factors)
    reg, grads = 0.0, {}
    for m, (Af, Bf) in enumerate(factors):
        M, N = Af @ Af.T - np.eye(len(Af)), Bf.T @ Bf - np.eye(Bf.shape[1])
        reg += (np.linalg.norm(M) + np.linalg.norm(N)) / n
        grads[f"dA{m}"] = 2 * M @ Af / np.linalg.norm(M) / n
        grads[f"dB{m}"] = 2 * Bf @ N / np.linalg.norm(N) / n
    return [
        {
            "name": "lora",
            "property": "LoRA with scaling s: y = x Wᵀ + s (x Aᵀ) Bᵀ, merged = W + s B A, "
            "unmerged = W − s B A "
            "(s is given; PEFT's default s = alpha / r)",
            "call": "y = lora_forward(x, W, A, B, s); merged = lora_merge(W, A, B, s); "
            "unmerged = lora_unmerge(W, A, B, s)",
            "scalars": {"scaling": s},
            "inputs": {"x": x, "W": W, "A": A, "B": B},
            "outputs": lora,
            "tolerance": {k: _tight(v) for k, v in lora.items()},
        },
        {
            "name": "pissa_init",
            "property": f"exact-SVD PiSSA init with r = {r}, alpha = {alpha} "
            f"(scaling s = alpha / r = {ps:g}): "
            "A = diag(√(σ_r/s)) V_rᵀ, B = U_r diag(√(σ_r/s)), W_res = W − s B A; given sign-free: W_res, "
            "B A, A Aᵀ = Bᵀ B = diag(σ_r / s)",
            "call": "W_res, A, B = pissa_init(W, r, alpha); BA = B @ A; AAt = A @ A.T; BtB = B.T @ B",
            "scalars": {"r": r, "alpha": alpha},
            "inputs": {"W": W},
            "outputs": pissa,
            "tolerance": {k: _tight(v) for k, v in pissa.items()},
        },
        {
            "name": "sorsa_split",
            "property": f"SORSA's split with r = {r}: B = U_r, S = σ_r, A = V_rᵀ, W_res = W − B diag(S) A; "
            "given sign-free: W_res, S, B diag(S) A, A Aᵀ = Bᵀ B = I",
            "call": "W_res, B, S, A = sorsa_split(W, r); BSA = B @ diag(S) @ A; AAt = A @ A.T; BtB = B.T @ B",
            "scalars": {"r": r},
            "inputs": {"W": W},
            "outputs": sorsa,
            "tolerance": {k: _tight(v) | {"atol": 1e-10} for k, v in sorsa.items()},
        },
        {
            "name": "sorsa_forward_merge",
            "property": "SORSA's adapted forward y = x W_resᵀ + ((x Aᵀ) ⊙ S) Bᵀ and merge "
            "W_res + B diag(S) A",
            "call": "y = sorsa_forward(x, W_res, B, S, A); merged = sorsa_merge(W_res, B, S, A)",
            "scalars": {},
            "inputs": {"x": x, "W_res": Wr, "B": Bs, "S": Ss, "A": As},
            "outputs": sorsa_fm,
            "tolerance": {k: _tight(v) for k, v in sorsa_fm.items()},
        },
        {
            "name": "sorsa_regularizer",
            "property": "L = mean over the 2·m matrices of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (not squared) "
            "for m = 2 "
            "adapted matrices (A0, B0), (A1, B1), and its gradient",
            "call": "value, [(dA0, dB0), (dA1, dB1)] = sorsa_regularizer([(A0, B0), (A1, B1)])",
            "scalars": {},
            "inputs": {"A0": factors[0][0], "B0": factors[0][1], "A1": factors[1][0], "B1": factors[1][1]},
            "outputs": {"value": np.array([reg]), **grads},
            "tolerance": {"value": _tight(np.array([reg]))} | {k: _tight(v) for k, v in grads.items()},
        },
    ]


def cases(impl: Implementation) -> list[dict[str, Any]]:
    """Every canonical case: name, property, call, scalars, inputs, outputs and per-output tolerance."""
    return [
        _decoder_case(impl, "mha", MHA, 0),
        _decoder_case(impl, "gqa", GQA, 1),
        _decoder_case(impl, "gpt2", GPT2, 2),
        _decoder_case(impl, "qwen3_window", QWEN3, 6),
        _decoder_case(impl, "gemma3", GEMMA3, 7),
        _causal_case(GQA, 3, 2),
        *_s2ft_cases(impl, "mha", MHA, 4),
        *_s2ft_cases(impl, "gqa", GQA, 5),
        *_lowrank_cases(),
    ]


def outputs_of(impl: Implementation, case: dict[str, Any], inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run one exported case (``case.json`` as a dict, its ``input/*`` arrays without the prefix) through
    an implementation: the outputs ``check.py`` compares, by name. This is the ``call`` line of each case,
    as code."""
    impl = impl if isinstance(impl, Guarded) else Guarded(impl)  # each call gets its own inputs
    sc, name = case["scalars"], case["name"]
    config = sc.get("config")
    w = {k.removeprefix("weight/"): v for k, v in inputs.items() if k.startswith("weight/")}
    if name.startswith("decoder_") and name != "decoder_causality":
        loss, grads = impl.decoder_loss_and_grads(config, w, inputs["tokens"], inputs["targets"])
        return {"logits": impl.decoder_logits(config, w, inputs["tokens"]), "loss": np.array([loss])} | {
            f"grad/{k}": g for k, g in grads.items()
        }
    if name == "decoder_causality":
        t = sc["t"]
        return {"prefix": impl.decoder_logits(config, w, inputs["tokens"])[:, : t + 1],
                "prefix_changed": impl.decoder_logits(config, w, inputs["tokens_changed"])[:, : t + 1]}
    if name.startswith("s2ft_"):
        heads, channels = selection(sc["heads"]), selection(sc["channels"])
        if name.startswith("s2ft_copermute"):
            permuted, state = impl.copermute(config, w, heads, channels)
            out = {"logits": impl.decoder_logits(config, permuted, inputs["tokens"])}
            D, H = config["head_dim"], config["num_attention_heads"]
            for layer, selected in heads.items():
                q = f"model.layers.{layer}.self_attn.q_proj.weight"
                # which original head's rows each permuted row block holds (None: no head's)
                head_of = {w[q][h * D : (h + 1) * D].tobytes(): h for h in range(H)}
                at = [head_of.get(permuted[q][j * D : (j + 1) * D].tobytes()) for j in range(H)]
                out[f"selected_at/{layer}"] = np.array([float(h in selected) for h in at])
            return out | {f"restored/{k}": v for k, v in impl.unpermute(config, permuted, state).items()}
        blocks = impl.s2ft_block_grads(config, w, inputs["tokens"], inputs["targets"], heads, channels)
        return {f"block/{k}": v for k, v in blocks.items()}
    i = inputs
    if name == "lora":
        s = sc["scaling"]
        return {"y": impl.lora_forward(i["x"], i["W"], i["A"], i["B"], s),
                "merged": impl.lora_merge(i["W"], i["A"], i["B"], s),
                "unmerged": impl.lora_unmerge(i["W"], i["A"], i["B"], s)}
    if name == "pissa_init":
        W_res, A, B = impl.pissa_init(i["W"], sc["r"], sc["alpha"])
        return {"W_res": W_res, "BA": B @ A, "AAt": A @ A.T, "BtB": B.T @ B}
    if name == "sorsa_split":
        W_res, B, S, A = impl.sorsa_split(i["W"], sc["r"])
        return {"W_res": W_res, "S": S, "BSA": B @ np.diag(S) @ A, "AAt": A @ A.T, "BtB": B.T @ B}
    if name == "sorsa_forward_merge":
        args = (i["W_res"], i["B"], i["S"], i["A"])
        return {"y": impl.sorsa_forward(i["x"], *args), "merged": impl.sorsa_merge(*args)}
    assert name == "sorsa_regularizer", f"unknown case {name!r}"
    value, grads = impl.sorsa_regularizer([(i["A0"], i["B0"]), (i["A1"], i["B1"])])
    out = {"value": np.array([value])}
    return out | {f"d{x}{m}": g[j] for m, g in enumerate(grads) for j, x in enumerate("AB")}


def export_vectors(directory: str | os.PathLike[str], impl: Implementation | None = None) -> list[Path]:
    """Write every case under ``directory``, ``check.py`` and a README stating each case's property."""
    if impl is None:
        from minift.spec.minift_impl import implementation as impl
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    written, lines = [], ["# minift spec test vectors (v2)", "", __doc__.split("\n\n", 1)[1].strip(), ""]
    for case in cases(impl):
        folder = root / case["name"]
        folder.mkdir(exist_ok=True)
        arrays = {f"input/{k}": np.ascontiguousarray(v) for k, v in case["inputs"].items()}
        arrays |= {
            f"expected/{k}": np.ascontiguousarray(v, dtype=np.float64) for k, v in case["outputs"].items()
        }
        save_file(arrays, str(folder / "arrays.safetensors"), metadata={"format": "np"})
        meta = {k: case[k] for k in ("name", "property", "call", "scalars", "tolerance")}
        meta["inputs"], meta["expected"] = sorted(case["inputs"]), sorted(case["outputs"])
        (folder / "case.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        lines += [f"## {case['name']}", "", case["property"] + ".", "", f"`{case['call']}`", ""]
        written.append(folder)
    shutil.copyfile(Path(__file__).with_name("check_vectors.py"), root / "check.py")
    (root / "README.md").write_text("\n".join(lines))
    return written
