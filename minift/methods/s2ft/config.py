"""What S2FT trains: how many heads and channels per layer, on which matrices, chosen how.

Every combination of the paper's Fig. 4 ablation is a configuration, not new code:
``head_targets`` ⊆ {q, k, v, o} and ``channel_targets`` ⊆ {gate, up, down}. The default is the
paper's main setting (Sec. 5.4): O input columns (whole heads) and Down input columns (channels).
One head set and one channel set are chosen per layer and shared by the targets of that side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

from minift.config import ModelConfig
from minift.errors import ConfigError

HEAD_TARGETS = ("q", "k", "v", "o")
CHANNEL_TARGETS = ("gate", "up", "down")


class Coupling(NamedTuple):
    """How a slot's weight moves with the selected units: ``unit`` says whose order permutes it (query
    heads, key/value heads or FFN channels), ``axis`` which side of the [out, in] weight the units
    occupy: producers (W1) own output rows, consumers (W2) own input columns (paper Sec. 3.1)."""

    unit: Literal["heads", "kv_heads", "channels"]
    axis: Literal["rows", "columns"]


# The one table of S2FT's coupled structures: co-permutation, block slots and adapters all read it.
COUPLING = {
    "q": Coupling("heads", "rows"),
    "k": Coupling("kv_heads", "rows"),
    "v": Coupling("kv_heads", "rows"),
    "o": Coupling("heads", "columns"),
    "gate": Coupling("channels", "rows"),
    "up": Coupling("channels", "rows"),
    "down": Coupling("channels", "columns"),
}
STRATEGIES = ("random", "weight", "activation", "product", "gradient")
Strategy = Literal["random", "weight", "activation", "product", "gradient"]


@dataclass(frozen=True)
class S2FTConfig:
    """Per layer, ``heads`` query heads and ``channels`` FFN channels (uniform across layers, the
    paper's Sec. 5.1 reading; the official code instead samples the units of all layers together, so
    layers get unequal counts).

    ``strategy`` (paper Sec. 3.2, App. D, Table 4): ``random`` (S2FT-R), ``weight`` (‖W‖, S2FT-W),
    ``activation`` (‖A‖, S2FT-A), ``product`` (‖W‖·‖A‖, S2FT-S), ``gradient`` (‖∂L/∂W‖, S2FT-G); the
    scored ones take the ``large`` or ``small`` end. ``layers`` None means every layer.
    """

    heads: int = 0
    channels: int = 0
    head_targets: tuple[str, ...] = ("o",)
    channel_targets: tuple[str, ...] = ("down",)
    strategy: Strategy = "random"
    variant: Literal["large", "small"] = "large"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("head_targets", "channel_targets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        bad = [t for t in self.head_targets if t not in HEAD_TARGETS]
        bad += [t for t in self.channel_targets if t not in CHANNEL_TARGETS]
        if bad:
            raise ConfigError(
                f"unknown S2FT targets {bad}: heads take {HEAD_TARGETS}, channels {CHANNEL_TARGETS}"
            )
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown S2FT strategy {self.strategy!r}: expected one of {STRATEGIES}")
        if self.variant not in ("large", "small"):
            raise ConfigError(f"S2FT variant must be 'large' or 'small', got {self.variant!r}")
        if self.heads < 0 or self.channels < 0:
            raise ConfigError(f"S2FT heads and channels must be ≥ 0, got {self.heads} and {self.channels}")

    @property
    def needs_data(self) -> bool:
        """Whether selection runs the model on calibration batches."""
        return self.strategy in ("activation", "product", "gradient")

    def layer_ids(self, config: ModelConfig) -> tuple[int, ...]:
        return tuple(range(config.n_layers)) if self.layers is None else self.layers

    def check(self, config: ModelConfig) -> None:
        """Raise ConfigError where this selection does not fit the model."""
        if self.heads > config.n_heads:
            raise ConfigError(f"S2FT heads={self.heads} exceeds the model's n_heads={config.n_heads}")
        if self.channels > config.intermediate_size:
            raise ConfigError(
                f"S2FT channels={self.channels} exceeds the model's "
                f"intermediate_size={config.intermediate_size}"
            )
        if config.arch == "gpt2" and "gate" in self.channel_targets:
            raise ConfigError("S2FT channel target 'gate': GPT-2 has no gate projection")
        bad = [i for i in self.layer_ids(config) if not 0 <= i < config.n_layers]
        if bad or len(set(self.layer_ids(config))) != len(self.layer_ids(config)):
            raise ConfigError(f"S2FT layers {self.layers} must be distinct ids in [0, {config.n_layers})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head_targets"], d["channel_targets"] = list(self.head_targets), list(self.channel_targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> S2FTConfig:
        d = dict(d)
        d["layers"] = None if d.get("layers") is None else tuple(d["layers"])
        return cls(**d)
