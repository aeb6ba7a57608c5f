"""The tutorials are executable lessons: each one and each exercise solution runs as a script, each
tutorial runs as a notebook and shows its pictures inline, none leaves a file behind, and every
``minift.<name>`` it mentions, in code or prose, exists.

A tutorial's own ``assert`` statements and ``check_grad`` calls are the pass criteria, so every claim
its prose makes ("the gradients match", "the merged model is identical") is executed here.

Scripts run from the repository root and notebooks from ``tutorials/`` (the two places a reader
starts them), each followed by a check that the checkout holds no new or changed file, so every
tutorial runs twice in the same checkout and must clean up after itself.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import runpy
import subprocess
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from minift import loss_and_grads
from minift.data import collate, encode_example
from minift.data.tasks import pretrain_heldout, task_tokenizer
from minift.methods.pissa import top_svd

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
LESSONS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
SOLUTIONS = sorted((TUTORIALS / "solutions").glob("[0-9][0-9]_*.py"))
NAME = re.compile(r"\bminift(?:\.[A-Za-z_]\w*)+")


def _id(path: Path) -> str:
    return str(path.relative_to(TUTORIALS))


def _resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted``, then getattr the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError names the missing attribute
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_tutorial_folder_is_found_and_not_empty():
    assert LESSONS, f"no tutorials found under {TUTORIALS}"


TOOL_CACHES = ("__pycache__", ".hypothesis", ".ruff_cache", ".pytest_cache", ".egg-info")


def _checkout_state() -> tuple[str, frozenset[str]]:
    """What a tutorial could leave behind: ``git status`` (new or changed files, ignored ones
    included) where the tests run from a git checkout, and the entries of the root and of
    ``tutorials/`` either way. Bytecode and tool caches are not the tutorial's."""
    status = ""
    if (ROOT / ".git").exists():
        status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
        status = "\n".join(line for line in status.splitlines() if not any(c in line for c in TOOL_CACHES))
    entries = frozenset(str(p.relative_to(ROOT)) for folder in (ROOT, TUTORIALS, TUTORIALS / "solutions")
                        for p in folder.iterdir() if p.name not in TOOL_CACHES)
    return status, entries


@pytest.fixture
def leaves_the_checkout_clean():
    before = _checkout_state()
    yield
    after = _checkout_state()
    assert after == before, f"the tutorial left files behind:\n{after[0]}\n{sorted(after[1] - before[1])}"


@functools.cache
def _run(path: Path) -> dict:
    """Run a tutorial or solution as a script from the repository root (as `python tutorials/…`),
    once per session; its globals, for the check-cell tests."""
    old, backend = Path.cwd(), os.environ.get("MPLBACKEND")
    os.chdir(ROOT)
    os.environ["MPLBACKEND"] = "Agg"  # never open a window
    try:
        return runpy.run_path(str(path), run_name="__main__")
    finally:
        os.chdir(old)
        if backend is None:
            del os.environ["MPLBACKEND"]
        else:
            os.environ["MPLBACKEND"] = backend


@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=_id)
def test_the_script_runs_to_completion_and_its_asserts_hold(path, leaves_the_checkout_clean):
    _run(path)


def _checks(namespace: dict) -> dict:
    """The tutorial's own check functions (not imported ones such as ``check_grad``)."""
    return {k: v for k, v in namespace.items()
            if k.startswith("check_") and getattr(v, "__module__", None) == "__main__"}


# One plausible wrong answer per check cell: the slip each check exists to catch.
def _mse_without_the_mean(x, W, b, y):
    d = 2 * (x @ W.T + b - y)  # forgot the mean's 1/(N·V)
    return {"x": d @ W, "W": d.T @ x, "b": d.sum(0)}


def _layernorm_without_the_mean_path(dy, x, w, b, eps):
    xc = x - x.mean(1, keepdims=True)
    rstd = ((xc**2).mean(1, keepdims=True) + eps) ** -0.5
    return {"x": dy * w * rstd, "w": (dy * xc * rstd).sum(0), "b": dy.sum(0)}  # dx misses two paths


def _plain_average(grads, counted):
    return {k: sum(g[k] for g in grads) / len(grads) for k in grads[0]}


def _largest_row_norms(down, k):  # Down is (C, F): its rows are the residual stream, not channels
    return tuple(sorted(np.argsort(np.linalg.norm(down, axis=1))[:k].tolist()))


def _one_segment_per_partial_group(heads, n_heads, n_kv_heads):
    G = n_heads // n_kv_heads
    count = [sum(h // G == g for h in heads) for g in range(n_kv_heads)]
    return max(int(bool(heads)), sum(0 < c < G for c in count))


def _fuse_by_concatenation(blocks, weights):  # a shared column appears twice instead of summed
    indices = np.concatenate([i for i, _ in blocks])
    deltas = np.concatenate([lam * d for (_, d), lam in zip(blocks, weights, strict=True)], axis=1)
    order = np.argsort(indices, kind="stable")
    return indices[order], deltas[:, order]


def _merge_into_the_first_columns(W, indices, delta):  # permuted coordinates, where training put them
    merged = W.copy()
    merged[:, : len(indices)] += delta
    return merged


def _retention_loss_on_the_whole_text(model):  # the loss counts the prompt's tokens too
    tokenizer = task_tokenizer()
    records = [{"text": ex.prompt + ex.answer} for ex in pretrain_heldout(0, 4)]
    held = collate([encode_example(tokenizer, r) for r in records], tokenizer.pad_id)
    return loss_and_grads(model, held.tokens, held.targets, attention_mask=held.attention_mask)[0]


def _pissa_without_scaling(W, r, alpha):  # forgot to divide σ by s = alpha / r
    U, sigma, Vt = np.linalg.svd(W, full_matrices=False)
    A, B = np.sqrt(sigma[:r])[:, None] * Vt[:r], U[:, :r] * np.sqrt(sigma[:r])
    return W - alpha / r * B @ A, A, B


def _error_against_the_whole_matrix(w, r, niter):  # compares with W, not with its rank-r part
    Uk, sk, Vtk = top_svd(w, r, niter=niter, rng=np.random.default_rng(1))
    return np.linalg.norm((Uk * sk) @ Vtk - w)


def _dropout_grads_without_the_mask_on_dx(G, x, W, A, B, s, mask, p):
    x_d = x * mask / (1 - p)
    dh = s * G @ B
    return {"x": G @ W + dh @ A, "A": dh.T @ x_d, "B": s * G.T @ (x_d @ A.T)}


def _ortho_grad_without_the_guard(X):  # 0/0 = nan at an exactly orthonormal X
    M = X @ X.T - np.eye(X.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * M @ X / np.linalg.norm(M)


def _deviation_with_signed_cosines(w_old, w_new):  # forgets that singular vectors have no sign
    U0, s0, Vt0 = np.linalg.svd(w_old, full_matrices=False)
    U1, s1, Vt1 = np.linalg.svd(w_new, full_matrices=False)
    return np.abs(s1 - s0).mean(), 1 - ((U0 * U1).sum(0).mean() + (Vt0 * Vt1).sum(1).mean()) / 2


def _dlogits_over_all_rows(logits, targets):  # divides by N where only the M counted targets count
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    counted = targets >= 0
    d = np.zeros_like(p)
    d[counted] = (p[counted] - np.eye(logits.shape[1])[targets[counted]]) / len(targets)
    return d


def _one_sided_difference(loss, x, eps):  # (f(x + ε) − f(x)) / ε: an O(ε) error, not O(ε²)
    grad = np.zeros(x.shape)
    base = loss()
    for idx in np.ndindex(*x.shape):
        old = x[idx].item()
        x[idx] = old + eps
        grad[idx] = (loss() - base) / eps
        x[idx] = old
    return grad


def _rope_forward_again(dy, cos, sin):  # rotates by +φ once more instead of rotating back
    from minift.layers.rope import rope_forward

    return rope_forward(dy, cos, sin)


def _angles_with_float32_frequencies(positions, D, theta):  # the library's float32 inv_freq, upcast
    from minift.config import RopeScaling
    from minift.layers.rope import rope_inv_freq

    return positions[:, None] * rope_inv_freq(D, theta, RopeScaling()).astype(np.float64)


def _softmax_backward_without_the_row_sum(dout, q, k, v, p):  # ds = p ⊙ dp: the Jacobian's diagonal only
    B, D = q.shape[0], q.shape[-1]
    qg = q.reshape(B, k.shape[1], -1, D)
    doutg = dout.reshape(qg.shape)
    ds = p * (doutg @ v.swapaxes(-1, -2))
    return ((ds @ k / np.sqrt(D)).reshape(q.shape), ds.swapaxes(-1, -2) @ qg / np.sqrt(D),
            p.swapaxes(-1, -2) @ doutg)


def _entropy_with_log_of_zero(p):  # 0 · log 0 = 0 · (−∞) = nan on every masked key
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(-(p * np.log(p)).sum(axis=-1).mean())


def _fancy_index_add(dx, tokens, V):  # dE[tokens] += dx: a repeated token keeps one write, not the sum
    dE = np.zeros((V, dx.shape[-1]))
    dE[tokens] += dx
    return dE


def _largest_without_the_blocks(cache):  # walks tuples and lists, not the blocks' dataclasses
    found, stack = {}, [("cache", cache)]
    while stack:
        where, obj = stack.pop()
        if isinstance(obj, np.ndarray):
            found[id(obj)] = (where, obj)
        elif isinstance(obj, tuple | list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(obj))
    return sorted(found.values(), key=lambda wa: -wa[1].nbytes)[:5]


def _drop_from_the_dict_only(folder, name):  # never writes the file back
    from minift.io.safetensors_io import read_safetensors

    read_safetensors(folder / "model.safetensors")[0].pop(name)
    return folder


WRONG = {  # tutorial → [(answer, a plausible wrong answer), …], one per check cell
    "01_backprop_by_hand": [
        ("mse_grads", _mse_without_the_mean),
        ("ignored_dlogits", _dlogits_over_all_rows),
        ("central_difference", _one_sided_difference),
    ],
    "02_rmsnorm_and_rope": [
        ("layernorm_grads", _layernorm_without_the_mean_path),
        ("rope_backward_by_hand", _rope_forward_again),
        ("linear_scaled_inv_freq",  # multiplies by the factor instead of dividing
         lambda D, theta, factor: theta ** (-np.arange(0, D, 2) / D) * factor),
        ("exact_angles", _angles_with_float32_frequencies),
    ],
    "03_attention": [
        ("kv_cache_mask",  # top-left aligned
         lambda T, S: np.tril(np.ones((T, S), dtype=bool))),
        ("attention_backward_grouped", _softmax_backward_without_the_row_sum),
        ("fold_repeated_kv_grad",  # splits H as (G, K): head h read as a copy of h % K
         lambda d, K: d.reshape(d.shape[0], -1, K, *d.shape[2:]).sum(axis=1)),
        ("mean_row_entropy", _entropy_with_log_of_zero),
    ],
    "04_decoder_and_training_step": [
        ("combine_micro_batches", _plain_average),
        ("embedding_backward_by_hand", _fancy_index_add),
        ("five_largest", _largest_without_the_blocks),
        ("fit_growth", lambda Ts, peaks: np.polyfit(Ts, peaks, 2)),  # polyfit gives (c, b, a)
    ],
    "05_checkpoints_and_generation": [
        ("tokens_processed",  # off by one with the cache, P + n without
         lambda P, n, cached: P + n if cached else n * (P + n)),
        ("drop_tensor", _drop_from_the_dict_only),
        ("round_to_bf16",  # truncates: rounds towards zero
         lambda x: (np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)),
    ],
    "06_lora_and_pissa": [
        ("rslora_scaling", lambda alpha, r: alpha / r),  # plain LoRA's scaling
        ("randomized_error", _error_against_the_whole_matrix),
        ("dropout_lowrank_grads", _dropout_grads_without_the_mask_on_dx),
    ],
    "07_sorsa": [
        ("ortho_grad", _ortho_grad_without_the_guard),
        ("regularizer_coefficient",  # divides by the accumulation steps in both modes
         lambda gamma, lr_max, accum, mode: gamma / lr_max / accum),
        ("deviation_by_hand", _deviation_with_signed_cosines),
    ],
    "08_s2ft_selection_and_permutation": [
        ("n_head_segments", _one_segment_per_partial_group),
        ("smallest_down_channels", _largest_row_norms),
        ("vo_parameters", lambda heads, C, D, G: 2 * D * C * len(heads)),  # V rows counted per query head
    ],
    "09_s2ft_partial_backprop": [
        ("kept_numbers", lambda kind, N, I, S: N * S),  # a row block keeps all of x, not N·S
        ("backprop_blocks", lambda n_layers, trained: len(trained)),  # only the trained blocks
        ("attention_flops", lambda B, T, H, D: (4 * B * H * T * T * D,) * 2),  # backward = forward
    ],
    "10_s2ft_adapters_and_serving": [
        ("switch_additions",  # counts only the new adapter
         lambda old, new: sum(b.delta.size for b in new.blocks.values())),
        ("fuse_columns", _fuse_by_concatenation),
        ("merge_columns", _merge_into_the_first_columns),
    ],
    "11_finetune_your_own_data": [
        ("text_labels", lambda ids: [-100, *ids[1:]]),  # BOS masked like a prompt
        ("retention_loss", _retention_loss_on_the_whole_text),
        ("calibration_batches",  # the inputs twice: targets not shifted
         lambda stream, n: [(stream.batch(i).tokens, stream.batch(i).tokens) for i in range(n)]),
    ],
    "12_checking_your_implementation": [
        ("pissa_init", _pissa_without_scaling),
        ("within_tolerance",  # normwise: a large entry covers a wrong small one
         lambda a, e, rtol, atol: np.linalg.norm(a - e) <= atol + rtol * np.linalg.norm(e)),
        ("block_grad_madds", lambda N, C, D, L, h, c: L * C * (h * D + c)),  # forgot the N tokens
    ],
    "13_instruction_models_on_a_cpu": [
        ("every_target_parameters",  # K and V counted per query head, not per key/value head
         lambda heads, n_channels, C, D, G: 4 * D * C * len(heads) + 3 * C * n_channels),
        ("extended_lr",  # still on the old 60-step plan: zero from step 60 on
         lambda step, lr_max, old, new: lr_max * max(0.0, (old - step) / old)),
        ("lora_form",  # the first S columns, not the selected ones
         lambda delta, columns, n_in: (np.eye(len(columns), n_in), delta)),
    ],
}


@pytest.mark.parametrize("path", LESSONS, ids=_id)
def test_every_check_cell_passes_the_solution_and_rejects_a_plausible_wrong_answer(path, capsys):
    checks = _checks(_run(path))
    assert checks, f"{_id(path)} has no check cell"
    wrong = dict(WRONG[path.stem])
    assert set(wrong) == {name.removeprefix("check_") for name in checks}, (
        f"{_id(path)}: every check cell needs a wrong answer in WRONG, and every wrong answer a check cell")
    solution = _run(TUTORIALS / "solutions" / path.name)
    for check_name, check in checks.items():
        answer_name = check_name.removeprefix("check_")
        assert answer_name in solution, f"solutions/{path.name} does not define {answer_name}"
        capsys.readouterr()
        check(solution[answer_name])
        assert "correct" in capsys.readouterr().out, f"{check_name} did not run on the solution"
        with pytest.raises(AssertionError):
            check(wrong[answer_name])


def test_every_tutorial_has_wrong_answers_for_its_checks():
    assert set(WRONG) == {p.stem for p in LESSONS}


PLOTTING = {p for p in LESSONS if "plt.subplots" in p.read_text(encoding="utf-8")}


@pytest.mark.parametrize("path", LESSONS, ids=_id)
def test_the_notebook_executes_and_shows_its_pictures_inline(path, monkeypatch, leaves_the_checkout_clean):
    """The tutorial as a reader opens it: converted by jupytext, executed cell by cell in a Jupyter
    kernel started in ``tutorials/``; a tutorial that plots must show at least one inline PNG."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in Jupyter
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = jupytext.read(path)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(TUTORIALS)}}).execute()
    pictures = sum("image/png" in out.get("data", {})
                   for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    if path in PLOTTING:
        assert pictures >= 1, f"{_id(path)} plots but showed no inline picture"
    else:
        assert pictures == 0


@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=_id)
def test_every_minift_name_the_script_mentions_exists(path):
    names = sorted(set(NAME.findall(path.read_text(encoding="utf-8"))))
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name}: {e}")
    assert not missing, f"{_id(path)} mentions names that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", LESSONS, ids=_id)
def test_the_tutorial_opens_with_prose_and_ends_with_exercises_and_their_check_cells(path):
    cells = re.split(r"^# %%", path.read_text(encoding="utf-8"), flags=re.MULTILINE)[1:]
    assert cells[0].startswith(" [markdown]"), "the first cell must be a markdown cell stating the goal"
    assert "**Library functions explained here.**" in cells[0], "the opening cell must name them"
    exercises = [i for i, c in enumerate(cells) if re.search(r"^# ## Exercises", c, flags=re.MULTILINE)]
    assert len(exercises) == 1, "one '## Exercises' section"
    after = cells[exercises[0] + 1:]
    assert after, "the exercises must be followed by their check cells"
    assert all(c.startswith(" [markdown]") or re.search(r"^def check_\w+", c, re.M) for c in after), (
        "after the exercises come only check cells (and their prose)")
    assert (TUTORIALS / "solutions" / path.name).exists(), f"solutions/{path.name} is missing"


@pytest.mark.parametrize("path", LESSONS, ids=_id)
def test_the_tutorial_opens_as_a_notebook_of_markdown_and_code_cells(path):
    jupytext = pytest.importorskip("jupytext")
    cells = jupytext.read(path).cells
    kinds = {c.cell_type for c in cells}
    assert kinds == {"markdown", "code"}, f"expected markdown and code cells, got {kinds}"
    assert cells[0].cell_type == "markdown"


def test_the_name_checker_rejects_a_name_that_does_not_exist():
    with pytest.raises(AttributeError):
        _resolve("minift.testing.no_such_function")
    assert isinstance(_resolve("minift.testing"), ModuleType)
