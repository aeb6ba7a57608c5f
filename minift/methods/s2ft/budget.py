"""Trainable-parameter budgets: S2FT counts, and the S2FT selection matching a LoRA rank.

LoRA of rank R on a (O, I) matrix trains R·(I + O) parameters; S2FT trains s·I (s output rows) or
s·O (s input columns). One query head costs D·C on Q or O, and D·C/G on K or V (its
share of its group's key/value head, when budgets are matched; ``s2ft_parameter_count`` counts the
whole KV heads that actually train); one FFN channel costs C on each of Gate, Up and Down. The paper
splits the budget "fairly" between O and Down (Sec. 5.4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from minift.config import ModelConfig
from minift.errors import ConfigError
from minift.methods.s2ft.config import S2FTConfig
from minift.model import slot_shapes

Units = tuple[Sequence[int], Sequence[int]]  # one layer's selection: (query heads, FFN channels)


def lora_parameter_count(
    config: ModelConfig, rank: int, targets: Sequence[str] = ("q", "k", "v", "up", "down")
) -> int:
    """R·(I + O) summed over the targets of every layer (a target the model lacks, GPT-2's gate, adds 0)."""
    shapes = slot_shapes(config)
    per_layer = sum(rank * (shapes[t].out_features + shapes[t].in_features) for t in targets if t in shapes)
    return config.n_layers * per_layer


def head_cost(config: ModelConfig, head_targets: Sequence[str]) -> float:
    """Parameters one selected query head adds in one layer."""
    assert config.head_dim is not None
    assert config.n_kv_heads is not None
    per = config.head_dim * config.hidden_size
    G = config.n_heads // config.n_kv_heads
    return sum(per if t in ("q", "o") else per / G for t in head_targets)


def channel_cost(config: ModelConfig, channel_targets: Sequence[str]) -> int:
    """Parameters one selected FFN channel adds in one layer."""
    return config.hidden_size * len(channel_targets)


def s2ft_parameter_count(
    config: ModelConfig, s2: S2FTConfig, selection: Mapping[int, Units] | None = None
) -> int:
    """The number of parameters S2FT trains, per layer: D·C for each selected query head on Q and
    on O; D·C for each key/value head on K and on V that at least one selected query head reads (a
    KV head is shared by G = H/K query heads, and its block trains whole); C for each selected
    channel on each channel target.

    With ``selection`` (layer → (query heads, channels), as ``apply_s2ft(selection=...)`` takes) the
    count is exact. Without it the selection is not known yet: K/V are counted for the fewest KV
    heads the ``s2.heads`` query heads can touch, ⌈heads / G⌉ (exact when whole groups are selected,
    and always when G = 1); a random draw of heads spread over more groups trains more.
    """
    assert config.head_dim is not None
    assert config.n_kv_heads is not None
    G = config.n_heads // config.n_kv_heads
    per_head = config.head_dim * config.hidden_size

    def layer_count(heads: Sequence[int], n_channels: int) -> int:
        kv_heads = len({h // G for h in heads})
        n_q = sum(t in ("q", "o") for t in s2.head_targets)
        n_kv = sum(t in ("k", "v") for t in s2.head_targets)
        return per_head * (len(heads) * n_q + kv_heads * n_kv) + n_channels * channel_cost(
            config, s2.channel_targets
        )

    if selection is not None:
        return sum(layer_count(tuple(h), len(set(ch))) for h, ch in selection.values())
    grouped = range(s2.heads)  # heads 0…heads−1 fill ⌈heads / G⌉ whole groups
    return len(s2.layer_ids(config)) * layer_count(grouped, s2.channels)


def match_lora_budget(
    config: ModelConfig,
    rank: int,
    *,
    lora_targets: Sequence[str] = ("q", "k", "v", "up", "down"),
    head_targets: Sequence[str] = ("o",),
    channel_targets: Sequence[str] = ("down",),
    head_share: float = 0.5,
    **options: object,
) -> S2FTConfig:
    """The S2FT configuration (heads and channels per layer) whose parameter count is closest to
    LoRA rank ``rank`` on ``lora_targets``: ``head_share`` of the budget goes to heads, the rest
    (and what rounding leaves) to channels. ``options`` go to ``S2FTConfig`` (strategy, …)."""
    if rank < 1 or not 0.0 <= head_share <= 1.0:
        raise ConfigError(f"LoRA rank must be ≥ 1 and head_share in [0, 1], got {rank} and {head_share}")
    layers = options.get("layers")
    n_layers = config.n_layers if layers is None else len(layers)  # S2FT spends the budget on these
    if n_layers == 0:
        raise ConfigError("S2FT layers is empty: the budget needs at least one layer to go to")
    per_layer = lora_parameter_count(config, rank, lora_targets) / n_layers
    heads = 0
    if head_targets and head_share > 0:
        heads = min(config.n_heads, round(head_share * per_layer / head_cost(config, head_targets)))
    channels = 0
    if channel_targets:
        left = per_layer - heads * head_cost(config, head_targets)
        channels = min(config.intermediate_size, max(0, round(left / channel_cost(config, channel_targets))))
    return S2FTConfig(
        heads=heads,
        channels=channels,
        head_targets=tuple(head_targets),
        channel_targets=tuple(channel_targets),
        **options,
    )  # type: ignore[arg-type]
