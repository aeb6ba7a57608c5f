"""Moving a model between the host (NumPy) and a GPU (CuPy), once, at load time.

Every compute function infers its array module from its arguments, so after ``to_device(model,
"cuda")`` the same forward, backward, optimizer and method code runs on the GPU. Sampling in
generation stays on the host: only the last position's logits, (B, V), are copied back each step.
"""

from __future__ import annotations

import dataclasses

from minift.backend import get_xp, to_xp, xp_for
from minift.model import Model, named_modules


def to_device(model: Model, device: str) -> Model:
    """Move every array of every parameter holder (slots of any kind included) to ``device``, in place.

    ``device`` is ``"cpu"`` or ``"cuda"``. Arrays that a slot derives from another (e.g. a view of a
    block) must be derived on access, not stored, for the move to keep them tied.
    """
    xp = xp_for(device)
    for _, holder in named_modules(model):
        for f in dataclasses.fields(holder):
            value = getattr(holder, f.name)
            if hasattr(value, "shape") and hasattr(value, "dtype"):
                setattr(holder, f.name, to_xp(value, xp))
    return model


def device_of(model: Model) -> str:
    """``"cuda"`` if the model's weights live on a GPU, else ``"cpu"``."""
    return "cpu" if get_xp(model.embed.weight).__name__ == "numpy" else "cuda"
