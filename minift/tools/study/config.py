"""What determines the study's numbers, besides the base model: ``StudyConfig`` and the quick preset."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from minift.errors import ConfigError
from minift.methods.registry import REGISTRY

METHODS = tuple(REGISTRY)  # the methods whose learning rate is swept: every registered one
LABELS = {name: method.label for name, method in REGISTRY.items()}
# Table 4 of the S2FT paper: (strategy, end) for random and the four scores at both ends
ABLATION = (
    ("random", "large"),
    *((s, v) for s in ("weight", "activation", "product", "gradient") for v in ("large", "small")),
)
ABLATION_LABELS = {"random": "R", "weight": "W", "activation": "A", "product": "S", "gradient": "G"}


@dataclass(frozen=True)
class StudyConfig:
    """Everything that determines the study's numbers (besides the base model)."""

    task: str = "min"  # the fine-tuning task of every comparison
    second_task: str = "shift"  # the other adapter of the fusion experiment
    seeds: int = 5  # n ≥ 1; mean ± std over seeds 0 … n−1
    steps: int = 300  # optimizer steps per run
    batch_size: int = 16
    warmup_steps: int = 30
    betas: tuple[float, float] = (0.9, 0.95)  # the S2FT scripts' AdamW betas
    rank: int = 4  # R of LoRA, PiSSA and SORSA; S2FT gets LoRA's parameter count
    targets: tuple[str, ...] = ("q", "k", "v", "up", "down")  # the S2FT paper's LoRA targets
    lrs: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "full": (1e-4, 3e-4, 1e-3),
            "lora": (7e-4, 2e-3, 6e-3),
            "s2ft": (1e-2, 3e-2, 1e-1),
            "pissa": (3e-4, 1e-3, 3e-3),
            "sorsa": (3e-4, 1e-3, 3e-3),
        }
    )
    gamma: float = 4e-4  # SORSA's γ (the paper's Llama-2 value)
    fusion_weights: tuple[float, float] = (1.0, 1.0)  # λ₁, λ₂: W₀ + λ₁Δ₁ + λ₂Δ₂
    calib_batches: int = 2  # calibration batches of the data-driven S2FT selection strategies
    n_train: int = 2000  # examples per split (see ``task_splits``)
    n_eval: int = 100  # validation, in-domain test and near-OOD examples
    n_retention: int = 20  # held-out pretraining prompts per skill (7 skills)
    smooth: int = 10  # trailing window of the smoothed training loss
    svd_every: int = 25  # steps between ΔΣ/ΔD records

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.steps < 1 or self.batch_size < 1 or self.rank < 1:
            raise ConfigError("study: seeds, steps, batch_size and rank must all be ≥ 1")
        missing = [m for m in METHODS if not self.lrs.get(m)]
        if missing:
            raise ConfigError(f"study: no learning rates for {missing}")
        if self.task == self.second_task:
            raise ConfigError("study: the fusion experiment needs two different tasks")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


QUICK = StudyConfig(
    seeds=2,
    steps=4,
    batch_size=4,
    warmup_steps=1,
    rank=2,
    n_train=32,
    n_eval=4,
    n_retention=1,
    smooth=2,
    svd_every=4,
    calib_batches=1,
    lrs={m: (1e-3, 1e-2) for m in METHODS},
)


