"""Which base model an adapter belongs to: its folder and a fingerprint, in ``minift_base.json``
beside the adapter's own files (PEFT and the S2FT reader ignore other files, so both formats keep
loading unchanged).

An adapter is a *difference* from one base model, so applying it to another gives a silently wrong
model. The fingerprint identifies the base cheaply, without hashing gigabytes:

    config    SHA-256 of config.json's bytes
    tensors   SHA-256 of every tensor's name, dtype and shape (all safetensors files, sorted)
    sample    SHA-256 of 16 windows of 4 KiB spread evenly over each file's data section, and the
              file sizes: a re-trained or re-quantised base of the same shapes differs there

``generate``, ``eval`` and ``export`` given only ``--adapter`` load the recorded folder; given a
``--model`` too, its fingerprint must match the recorded one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from minift.errors import CheckpointError
from minift.io.atomic import write_file_atomic
from minift.io.jsonio import read_json_object
from minift.io.safetensors_io import read_header

PROVENANCE = "minift_base.json"
EMBEDDED_NAME = "embedded"  # how the shipped base model is recorded (its path moves with the install)
_WINDOWS, _WINDOW_BYTES = 16, 4096


def fingerprint(folder: str | Path) -> dict[str, str]:
    """The fingerprint of a Hugging Face model folder (module docstring)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise CheckpointError(f"{folder}: not a model folder (expected config.json and *.safetensors)")
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    tensors, sample = hashlib.sha256(), hashlib.sha256()
    for path in files:
        infos, _ = read_header(path)
        for name in sorted(infos):
            info = infos[name]
            tensors.update(f"{name}|{info.dtype}|{list(info.shape)};".encode())
        starts = [i.begin for i in infos.values()]
        begin, size = (min(starts) if starts else 0), path.stat().st_size
        sample.update(f"{path.name}:{size};".encode())
        with path.open("rb") as f:
            for k in range(_WINDOWS):
                f.seek(begin + (size - begin) * k // _WINDOWS)
                sample.update(f.read(_WINDOW_BYTES))
    return {"config": config, "tensors": tensors.hexdigest(), "sample": sample.hexdigest()}


def write_provenance(adapter: str | Path, base: str | Path, base_name: str | None = None) -> Path:
    """Record ``base`` (a model folder) as the base of the adapter folder ``adapter``."""
    record = {
        "base_model": base_name or str(Path(base).resolve()),
        "fingerprint": fingerprint(base),
    }
    path = Path(adapter) / PROVENANCE
    write_file_atomic(path, (json.dumps(record, indent=2) + "\n").encode())
    return path


def recorded_base(adapter: str | Path) -> tuple[str, dict[str, Any] | None] | None:
    """(base model, fingerprint or None) an adapter folder records: ``minift_base.json``, else a PEFT
    ``adapter_config.json``'s ``base_model_name_or_path`` (no fingerprint); None if neither says."""
    adapter = Path(adapter)
    path = adapter / PROVENANCE
    if path.is_file():
        record = read_json_object(path, error=CheckpointError)
        base, fp = record.get("base_model"), record.get("fingerprint")
        if not _is_path(base) or not isinstance(fp, dict):
            raise CheckpointError(
                f"{path}: expected 'base_model' (a folder path) and 'fingerprint' (an object)"
            )
        return base, fp
    peft = adapter / "adapter_config.json"
    if peft.is_file():
        base = read_json_object(peft, error=CheckpointError).get("base_model_name_or_path")
        if _is_path(base):
            return base, None
    return None


def _is_path(value: Any) -> bool:
    """A string the file system can take as a path (no NUL byte, not absurdly long)."""
    return isinstance(value, str) and 0 < len(value) <= 4096 and "\x00" not in value


def check_base(adapter: str | Path, base: str | Path, expected: dict[str, Any] | None) -> None:
    """Raise CheckpointError if the model folder ``base`` is not the one the adapter was trained on."""
    if expected is None:
        return
    got = fingerprint(base)
    differ = [k for k in ("config", "tensors", "sample") if got.get(k) != expected.get(k)]
    if differ:
        what = {"config": "config.json", "tensors": "tensor names/shapes/dtypes", "sample": "weights"}
        raise CheckpointError(
            f"{Path(adapter) / PROVENANCE}: the adapter was trained on another base model than {base} "
            f"(its {', '.join(what[k] for k in differ)} differ); pass the recorded base with --model"
        )
