"""What determines the study's numbers, besides the base model: the arms (what is trained and how),
``StudyConfig`` (sizes, schedule, ladders, seeds) and the quick preset."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from minift.errors import ConfigError

S2FT_TARGETS = ("q", "k", "v", "up", "down")  # the S2FT paper's LoRA targets (its Table 6)
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the SORSA paper's: every projection


@dataclass(frozen=True)
class Arm:
    """One way of fine-tuning that the study trains over several seeds.

    ``group`` names the paper whose setting the arm follows: "s2ft" (rank R on the S2FT paper's LoRA
    targets, AdamW betas (0.9, 0.95) as its scripts) or "sorsa" (rank R on all seven projections,
    betas (0.9, 0.999): the optimizer's usual betas, which the SORSA code keeps). An S2FT arm's budget
    is LoRA's parameter count at rank ``budget`` · R on the group's targets.
    """

    name: str
    label: str
    method: str  # a registered method
    group: str = "s2ft"
    task: str = "main"  # "main" or "second" (the fusion experiment's other adapter)
    strategy: str = "random"  # S2FT selection
    variant: str = "large"
    head_targets: tuple[str, ...] = ("o",)
    channel_targets: tuple[str, ...] = ("down",)
    budget: float = 1.0
    lora_targets: tuple[str, ...] | None = None  # None: the group's targets
    at_s2ft_budget: bool = False  # LoRA's rank chosen so its parameter count is closest to S2FT's
    gamma: float | None = None  # SORSA: None = the study's γ
    replay: bool = False  # mix pretraining examples into the training data
    lr_from: str | None = None  # reuse this arm's chosen learning rate; None: its own ladder
    svd: bool = False  # record ΔΣ/ΔD
    keep: bool = False  # save the adapter (fusion)
    ablation: bool = False  # the selection ablation: ``ablation_seeds`` seeds


def _s2ft(name: str, label: str, **kw: Any) -> Arm:
    return Arm(name, label, "s2ft", **kw)


ARMS: tuple[Arm, ...] = (
    # S2FT vs LoRA vs full FT (S2FT paper, Tables 1–3, Fig. 2)
    Arm("full", "full FT", "full", svd=True),
    Arm("lora", "LoRA", "lora", keep=True),
    _s2ft("s2ft", "S2FT (O+Down, random)", ablation=True),
    # selection ablation (Table 4), each with its own ladder
    _s2ft("s2ft-a-small", "S2FT, activation-small", strategy="activation", variant="small", ablation=True),
    _s2ft("s2ft-g-large", "S2FT, gradient-large", strategy="gradient", variant="large", ablation=True),
    # controls: placement, the paper's other variants, budget, replay
    Arm(
        "lora-od", "LoRA on O+Down at S2FT's budget", "lora", lora_targets=("o", "down"), at_s2ft_budget=True
    ),
    _s2ft("s2ft-qkv", "S2FT (Q/K/V heads + Down)", head_targets=("q", "k", "v")),
    _s2ft("s2ft-up", "S2FT (O heads + Up rows)", channel_targets=("up",)),
    _s2ft("s2ft-down", "S2FT (Down only, as for GQA)", head_targets=()),
    _s2ft("s2ft-x0.5", "S2FT ×0.5 budget", budget=0.5),
    _s2ft("s2ft-x4", "S2FT ×4 budget", budget=4.0),
    # replay changes the data, not the method: at the method's rate, it isolates what replay buys
    Arm("full-replay", "full FT + replay", "full", replay=True, lr_from="full"),
    Arm("lora-replay", "LoRA + replay", "lora", replay=True, lr_from="lora"),
    _s2ft("s2ft-replay", "S2FT + replay", replay=True, lr_from="s2ft"),
    # SORSA vs PiSSA vs LoRA (SORSA paper), all seven projections
    Arm("lora-all", "LoRA (all 7)", "lora", group="sorsa", svd=True),
    Arm("pissa", "PiSSA (all 7)", "pissa", group="sorsa", svd=True),
    Arm("sorsa", "SORSA (all 7)", "sorsa", group="sorsa", svd=True),
    Arm("sorsa-g0", "SORSA, γ = 0", "sorsa", group="sorsa", gamma=0.0, lr_from="sorsa", svd=True),
    # fusion (Table 5): weight-large/-small on both tasks; the weight score does not depend on the task,
    # so the same end twice selects the same channels, opposite ends disjoint ones
    _s2ft("s2ft-wl", "S2FT, weight-large", strategy="weight", lr_from="s2ft", keep=True),
    _s2ft("s2ft-ws", "S2FT, weight-small", strategy="weight", variant="small", lr_from="s2ft", keep=True),
    Arm("lora-2", "LoRA (second task)", "lora", task="second", keep=True),
    _s2ft("s2ft-2", "S2FT (second task)", task="second"),
    _s2ft(
        "s2ft-wl-2",
        "S2FT, weight-large (second)",
        task="second",
        strategy="weight",
        lr_from="s2ft-2",
        keep=True,
    ),
    _s2ft(
        "s2ft-ws-2",
        "S2FT, weight-small (second)",
        task="second",
        strategy="weight",
        variant="small",
        lr_from="s2ft-2",
        keep=True,
    ),
)
ARM = {a.name: a for a in ARMS}
LADDER_ARMS = tuple(a.name for a in ARMS if a.lr_from is None)

# The middle of each ladder's first three rates (× 1/f, 1, f): where earlier runs on this world chose.
LR_CENTERS = {
    "full": 1e-3,
    "lora": 2e-2,
    "lora-od": 2e-2,
    "lora-2": 2e-2,
    "lora-all": 1e-2,
    "pissa": 3e-3,
    "sorsa": 3e-3,
    "s2ft-x4": 3e-2,
} | {name: 9e-2 for name in LADDER_ARMS if name.startswith("s2ft") and name != "s2ft-x4"}


@dataclass(frozen=True)
class StudyConfig:
    """Everything that determines the study's numbers (besides the base model)."""

    task: str = "instruct"  # the fine-tuning task of every comparison (``tasks.study_splits``)
    second_task: str = "min"  # the other adapter of the fusion experiment
    seeds: int = 5  # reported seeds 1 … seeds (seed 0 is the learning-rate sweep's, never reported)
    ablation_seeds: int = 10  # reported seeds of the selection ablation
    steps: int = 200  # optimizer steps per run
    batch_size: int = 16
    warmup_steps: int = 20
    betas: tuple[float, float] = (0.9, 0.95)  # the S2FT scripts' AdamW betas
    sorsa_betas: tuple[float, float] = (0.9, 0.999)  # the SORSA code's (the HF Trainer default)
    rank: int = 4  # R of the low-rank methods; S2FT gets LoRA's parameter count
    lr_centers: dict[str, float] = field(default_factory=lambda: dict(LR_CENTERS))
    ladder: float = 3.0  # ratio between neighbouring rates of a ladder
    max_extend: int = 4  # rates a ladder may add beyond its first three before giving up
    gamma: float = 4e-4  # SORSA's γ (the paper's Llama-2 value)
    replay: float = 0.1  # fraction of a replay arm's training data drawn from pretraining
    # validation exact match of the matched-accuracy comparisons: a level every arm reaches in most
    # seeds (no S2FT arm and no LoRA on O+Down reached 70% on the study base in 200 steps; 55% at most)
    match_level: float = 0.35
    eval_every: int = 25  # steps between checkpoint evaluations (validation, ΔΣ/ΔD)
    fusion_weights: tuple[float, float] = (1.0, 1.0)  # λ₁, λ₂: W₀ + λ₁Δ₁ + λ₂Δ₂
    calib_batches: int = 2  # calibration batches of the data-driven S2FT selection strategies
    n_train: int = 2000  # training examples
    n_eval: int = 100  # validation, in-domain test, near- and far-OOD examples
    n_retention: int = 20  # held-out pretraining prompts per skill
    smooth: int = 10  # trailing window of the smoothed training loss

    def __post_init__(self) -> None:
        if min(self.seeds, self.ablation_seeds) < 2 or self.steps < 1 or self.batch_size < 1 or self.rank < 1:
            raise ConfigError("study: seeds ≥ 2 (a paired interval needs two), steps, batch_size, rank ≥ 1")
        missing = [a for a in LADDER_ARMS if a not in self.lr_centers]
        if missing:
            raise ConfigError(f"study: no learning-rate ladder for {missing}")
        if self.task == self.second_task:
            raise ConfigError("study: the fusion experiment needs two different tasks")
        if self.ladder <= 1 or not 0 <= self.match_level <= 1 or not 0 <= self.replay < 1:
            raise ConfigError("study: ladder > 1, 0 ≤ match_level ≤ 1 and 0 ≤ replay < 1")

    def task_of(self, arm: Arm) -> str:
        return self.task if arm.task == "main" else self.second_task

    def report_seeds(self, arm: Arm) -> range:
        """Seeds 1 … n: seed 0 chose the learning rate and is never among them."""
        return range(1, 1 + (self.ablation_seeds if arm.ablation else self.seeds))

    def first_grid(self, arm: str) -> tuple[float, ...]:
        c = self.lr_centers[arm]
        return (c / self.ladder, c, c * self.ladder)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


QUICK = StudyConfig(
    seeds=3,
    ablation_seeds=4,
    steps=100,
    warmup_steps=10,
    n_train=400,
    n_eval=40,
    n_retention=8,
    smooth=5,
    calib_batches=1,
    match_level=0.3,  # what every arm reaches in 100 steps
)
