"""Training checkpoints: trainable arrays and optimizer state as safetensors, the rest as JSON.

A run directory holds one folder per saved step and a ``latest`` file naming the newest complete one:

    run/
      latest                     "step-00000200"
      step-00000200/
        trainable.safetensors    every array of ``trainable_parameters(model)``, keys unchanged
        optimizer.safetensors    AdamW moments ``m.<key>``, ``v.<key>``
        state.json               step, optimizer step t, host RNG state, model and training config

Whatever slot kind a method uses, its checkpoint is exactly its trainable arrays (an S2FT block, LoRA
factors, SORSA's singular values), so the frozen base is not stored: a resumed run rebuilds it the way
the first run did (same seed or same pretrained folder), and ``restore_checkpoint`` checks the config matches.

Writes are atomic (``minift.io.atomic``): a step folder is written under a temporary name and swapped
into place whole, then ``latest`` is replaced by rename too (``os.replace``). A crash at any moment
leaves ``latest`` naming a complete checkpoint; when a step that already has a folder is saved again,
the old folder sits whole under a temporary name for the instant between two renames, since a
directory cannot replace a non-empty one in a single rename. No pickle: safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minift.backend import Array, get_xp, to_numpy
from minift.errors import CheckpointError
from minift.io.atomic import replace_folder, write_file_atomic
from minift.io.jsonio import Fields, ascii_int, read_json_object
from minift.io.safetensors_io import read_safetensors, write_safetensors
from minift.model import Model, trainable_parameters
from minift.optim import AdamW

FORMAT = "minift-training-checkpoint"
VERSION = 1


# ----------------------------------------------------------------------------------------------------
# files


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = read_json_object(path)
    except CheckpointError as e:
        detail = str(e).removeprefix(f"{path}: ")
        raise CheckpointError(f"{path}: corrupt checkpoint state ({detail})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a minift training checkpoint (expected \"format\": \"{FORMAT}\")")
    if state.get("version") != VERSION or type(state.get("version")) is not int:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')!r}; this minift reads version {VERSION}"
        )
    f = Fields(state, str(path))
    for key in ("step", "optimizer_t"):
        f.int(key, lo=0, hi=2**62)  # a run of more steps never ends
    f.obj_("model_config")
    f.obj_("train_config", {})
    _check_rng(Fields(f.obj_("rng"), f"{path}: 'rng'"))
    return state


def _check_rng(rng: Fields) -> None:
    """The host RNG state, checked completely: NumPy's setter accepts wrong types and ranges (a float
    ``inc``, a string ``has_uint32``) and then continues a different stream, so a resume would not
    be bitwise identical to the uninterrupted run."""
    kind = rng.str("bit_generator", choices=("PCG64", "PCG64DXSM"))  # what default_rng makes
    inner = Fields(rng.obj_("state"), f"{rng.where}['state'] ({kind})")
    inner.int("state", lo=0, hi=2**128 - 1)
    if inner.int("inc", lo=0, hi=2**128 - 1) % 2 == 0:  # PCG's increment is odd by construction
        raise inner.fail("inc", "odd (PCG increments are)", inner.obj["inc"])
    rng.int("has_uint32", lo=0, hi=1)
    rng.int("uinteger", lo=0, hi=2**32 - 1)
    for fields, keys in ((rng, {"bit_generator", "state", "has_uint32", "uinteger"}),
                         (inner, {"state", "inc"})):
        if set(fields.obj) != keys:
            raise CheckpointError(f"{fields.where}: expected exactly the keys {sorted(keys)}, got "
                                  f"{sorted(fields.obj)}")


def _step_of(folder: Path) -> int | None:
    """The step a ``step-NNNNNNNN`` folder holds, or None for any other name."""
    digits = folder.name.removeprefix("step-")
    return ascii_int(digits) if digits != folder.name else None


# ----------------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class Checkpoint:
    """A loaded checkpoint, on the host."""

    path: Path  # the step folder
    params: dict[str, np.ndarray]  # keyed as trainable_parameters(model)
    optimizer: dict[str, np.ndarray]  # keyed as AdamW.state_arrays()
    state: dict[str, Any]  # step, optimizer_t, rng, model_config, train_config, …

    @property
    def step(self) -> int:
        return int(self.state["step"])


def save_checkpoint(
    run_dir: str | Path,
    model: Model,
    optimizer: AdamW,
    *,
    step: int,
    rng: np.random.Generator,
    train_config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of ``step`` into ``run_dir`` atomically and point ``latest`` at it; keep it
    and the newest ``keep`` − 1 folders of earlier steps (folders of later steps, left by another run,
    are not touched). Returns the step folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    state = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "optimizer_t": optimizer.t,
        "rng": rng.bit_generator.state,  # plain ints and strings: JSON holds them exactly
        "model_config": model.config.to_dict(),
        "train_config": train_config,
        **(extra or {}),
    }
    final = run_dir / name
    # a full disk or Ctrl-C half-way: the temporary folder is removed and the old step folder, if this
    # step was saved before (e.g. after a resume), is left whole
    with replace_folder(final) as tmp:
        files = (("trainable", trainable_parameters(model)), ("optimizer", optimizer.state_arrays()))
        for file, arrays in files:
            write_safetensors(tmp / f"{file}.safetensors", {k: to_numpy(a) for k, a in arrays.items()})
        write_file_atomic(tmp / "state.json", json.dumps(state, indent=1).encode())
    write_file_atomic(run_dir / "latest", name.encode())
    # Prune among the steps before this one: a folder of a later step belongs to another (longer) run
    # written into the same folder, and pruning by name alone would delete the checkpoint just written.
    earlier = sorted(
        (s, p) for p in run_dir.glob("step-*") if (s := _step_of(p)) is not None and s < step
    )
    for _, stale in earlier[: max(len(earlier) - (keep - 1), 0)] if keep > 0 else []:
        with contextlib.suppress(OSError):
            shutil.rmtree(stale)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step folder ``latest`` names, or None when ``run_dir`` holds no checkpoint yet."""
    pointer = Path(run_dir) / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: cannot read the name of the latest step folder ({e})") from None
    folder = Path(run_dir) / name
    if _step_of(folder) is None or folder.name != name or not folder.is_dir():
        raise CheckpointError(f"{pointer}: names {name!r}, which is not a step folder of this run")
    return folder


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a step folder, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / "latest").exists():
        found = latest_checkpoint(path)
        assert found is not None
        path = found
    if not (path / "state.json").exists():
        raise CheckpointError(
            f"{path}: no checkpoint here (expected state.json, or a run folder with 'latest')"
        )
    state = _read_state(path / "state.json")
    return Checkpoint(
        path,
        read_safetensors(path / "trainable.safetensors", floats="trainable arrays")[0],
        read_safetensors(path / "optimizer.safetensors", floats="optimizer moments")[0],
        state,
    )


def _copy_into(target: Array, source: np.ndarray, where: str) -> None:
    if target.shape != source.shape or target.dtype != source.dtype:
        raise CheckpointError(
            f"{where}: checkpoint array is {source.dtype}{list(source.shape)}, the model expects "
            f"{target.dtype}{list(target.shape)}"
        )
    target[...] = get_xp(target).asarray(source)


def restore_checkpoint(ckpt: Checkpoint, model: Model, optimizer: AdamW, rng: np.random.Generator) -> None:
    """Put a checkpoint back into a model built as the first run built it: trainable arrays (in place,
    so views stay views), optimizer moments and step, and the host RNG state.

    Raises:
        CheckpointError when the model config, the set of trainable arrays or an array's shape or dtype
        differs from the checkpoint's, naming the file and key.
    """
    saved_config = ckpt.state.get("model_config")
    if saved_config != json.loads(json.dumps(model.config.to_dict())):
        raise CheckpointError(
            f"{ckpt.path / 'state.json'}: model_config differs from the model being trained"
        )
    params = trainable_parameters(model)
    file = ckpt.path / "trainable.safetensors"
    missing, unexpected = sorted(set(params) - set(ckpt.params)), sorted(set(ckpt.params) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: trainable arrays differ from the model's: missing {missing}, unexpected {unexpected}"
        )
    state = optimizer.state_arrays()
    opt_file = ckpt.path / "optimizer.safetensors"
    if set(state) != set(ckpt.optimizer):
        raise CheckpointError(f"{opt_file}: optimizer state keys differ from the model's trainable arrays")
    try:
        type(rng.bit_generator)().state = ckpt.state["rng"]  # checked on a scratch generator first
    except (TypeError, ValueError, KeyError) as e:
        kind = type(rng.bit_generator).__name__
        raise CheckpointError(
            f"{ckpt.path / 'state.json'}: 'rng' is not a {kind} state ({type(e).__name__}: {e})"
        ) from None
    for key, a in params.items():
        _copy_into(a, ckpt.params[key], f"{file}: {key!r}")
    for key, a in state.items():
        _copy_into(a, ckpt.optimizer[key], f"{opt_file}: {key!r}")
    optimizer.t = ckpt.state["optimizer_t"]
    rng.bit_generator.state = ckpt.state["rng"]
