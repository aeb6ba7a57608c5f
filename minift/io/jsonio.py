"""Reading the JSON files that sit beside checkpoints and adapters (config.json, adapter_config.json,
state.json, …): one reader, so every such file fails the same clear way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minift.errors import CheckpointError, MinIFTError


def read_json_object(path: Path, *, error: type[MinIFTError] = CheckpointError) -> dict[str, Any]:
    """The JSON object in ``path``; an unreadable file, invalid JSON (or UTF-8) or a value that is not
    an object raises ``error`` naming the file and what was wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
