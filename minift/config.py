"""Model configuration for the Llama family (Llama, Mistral, Qwen2, Qwen3), Gemma 3 (text) and GPT-2.

Field names follow the shape alphabet of ``minift/__init__.py``. Reading and writing Hugging Face
``config.json`` files lives in ``minift.io.hub``; this module only states and checks the architecture.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

from minift.errors import ConfigError

Arch = Literal["llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2"]
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names, kept as they are
RopeKind = Literal["default", "linear", "llama3"]

# Upper bounds no real model comes near (the largest released ones have ~128 layers, widths of ~2^14,
# vocabularies of ~2^18, contexts of ~2^20), checked before anything is allocated: a corrupt or hostile
# config.json asking for 10^12 layers is an error, not an hour-long loop or an out-of-memory kill.
LIMITS: dict[str, int] = {
    "vocab_size": 2**24, "hidden_size": 2**20, "intermediate_size": 2**22, "n_layers": 1024,
    "n_heads": 2**14, "n_kv_heads": 2**14, "head_dim": 2**14, "max_position_embeddings": 2**24,
}

# The models compute in float32 (or lower): a float setting outside its normal range becomes 0 or inf
# there (a RoPE factor of 1e-320 divides by zero) although it is finite and positive in the JSON.
F32_TINY, F32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38
MAX_ROPE_FACTOR = 2.0**20  # real scalings stretch a context 2-64 times
MAX_NORM_EPS = 1.0  # real epsilons are 1e-6 to 1e-5: an epsilon near the activations' scale erases them


def is_int(x: Any) -> bool:
    """An integer and not a bool (``True`` is an ``int`` in Python; a config meaning 1 never says true)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_finite(x: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _reject_unknown_keys(cls: type, d: dict[str, Any], what: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what} fields {unknown}; expected some of {sorted(names)}")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are rescaled for long contexts (HF ``rope_scaling``/``rope_parameters``)."""

    kind: RopeKind = "default"  # "default": no scaling; "linear": inv_freq / factor; "llama3": banded
    factor: float = 1.0  # linear and llama3
    low_freq_factor: float = 1.0  # llama3: wavelengths above orig/low are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below orig/high are kept
    original_max_position_embeddings: int = 8192  # llama3: the context the model was trained on

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeScaling:
        """From the dict ``ModelConfig.to_dict`` writes; unknown keys are an error that names them."""
        _reject_unknown_keys(cls, d, "rope_scaling")
        return cls(**d)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in ("default", "linear", "llama3"):
            raise ConfigError(
                f"unsupported RoPE type {self.kind!r}: minift supports 'default', 'linear' and 'llama3'"
            )
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not is_finite(value) or (value != 0 and not F32_TINY <= abs(value) <= MAX_ROPE_FACTOR):
                raise ConfigError(f"RoPE scaling {name} must be a finite number that float32 holds, at most "
                                  f"{MAX_ROPE_FACTOR:g}, got {value!r}")
        orig = self.original_max_position_embeddings
        if not (is_int(orig) and orig <= LIMITS["max_position_embeddings"]):
            raise ConfigError(f"RoPE original_max_position_embeddings must be an integer <= "
                              f"{LIMITS['max_position_embeddings']}, got {orig!r}")
        if self.kind != "default" and self.factor <= 0:
            raise ConfigError(f"RoPE scaling factor must be positive, got {self.factor}")
        llama3 = self.kind == "llama3"
        if llama3 and not (self.low_freq_factor > 0 and self.original_max_position_embeddings > 0):
            raise ConfigError(
                "llama3 RoPE needs low_freq_factor > 0 and original_max_position_embeddings > 0, got "
                f"{self.low_freq_factor} and {self.original_max_position_embeddings}"
            )
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(
                "llama3 RoPE needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder-only transformer.

    ``n_kv_heads`` and ``head_dim`` may be left as None and are then resolved to H and C // H.
    GPT-2 (``arch="gpt2"``) uses LayerNorm, learned positions, tanh-GELU and biases everywhere.
    Gemma 3 (``arch="gemma3"``, Hugging Face's ``gemma3_text``) differs from Llama in fixed ways that
    the properties below name: RMSNorms scale by (1 + w), the embedding is scaled by √C, the MLP is
    GeGLU with the tanh GELU, a second norm follows attention and the MLP before each residual add,
    and every layer has q/k norms; its settings are the attention scale ``query_pre_attn_scalar`` and
    the RoPE base of its sliding-window layers ``rope_local_theta``.
    """

    vocab_size: int  # V
    hidden_size: int  # C
    intermediate_size: int  # F, the FFN width
    n_layers: int  # L
    n_heads: int  # H, query heads
    n_kv_heads: int | None = None  # K, key/value heads; GQA when K < H (None → H)
    head_dim: int | None = None  # D; may differ from C // H, e.g. Mistral-Nemo (None → C // H)
    arch: Arch = "llama"
    norm_eps: float = 1e-6  # RMSNorm (or GPT-2 LayerNorm) epsilon
    rope_theta: float = 10000.0  # RoPE base θ
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048  # GPT-2: rows of the learned position table
    tie_word_embeddings: bool = False  # the LM head reuses the token embedding E
    qkv_bias: bool = False  # bias on q, k, v (Llama attention_bias, always on in Qwen2)
    o_bias: bool = False  # bias on o (Llama attention_bias; never in Qwen2)
    mlp_bias: bool = False  # bias on gate, up, down (Llama mlp_bias)
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()  # one or several ids that end generation
    pad_token_id: int | None = None
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on every query and key head, before RoPE
    sliding_window: int | None = None  # W: a query sees only the W most recent keys, itself included
    layer_types: tuple[str, ...] = ()  # per layer "full_attention"/"sliding_attention"; () = every
    # layer sliding when ``sliding_window`` is set (Mistral), else every layer full
    query_pre_attn_scalar: float | None = None  # attention scale 1/√s (Gemma 3); None: 1/√D
    rope_local_theta: float | None = None  # RoPE base θ of sliding-window layers, unscaled (Gemma 3);
    # None: those layers rotate as the others (rope_theta, rope_scaling)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None and is_int(self.n_heads) and self.n_heads > 0 and is_int(self.hidden_size):
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)
        if is_int(self.eos_token_id):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        if not (isinstance(self.eos_token_id, tuple | list) and all(is_int(e) for e in self.eos_token_id)):
            raise ConfigError(
                f"eos_token_id must be an integer or a list of integers, got {self.eos_token_id!r}"
            )
        object.__setattr__(self, "eos_token_id", tuple(int(e) for e in self.eos_token_id))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads",
                     "max_position_embeddings"):
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if is_int(value) and value > limit:
                raise ConfigError(f"{name}={value} is beyond any real model (at most {limit})")
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (is_finite(self.norm_eps) and is_finite(self.rope_theta) and self.norm_eps <= MAX_NORM_EPS
                and (self.rope_theta <= 0 or F32_TINY <= self.rope_theta <= F32_MAX)):
            raise ConfigError(f"norm_eps (at most {MAX_NORM_EPS:g}) and rope_theta must be finite numbers "
                              f"that float32 holds, got {self.norm_eps!r} and {self.rope_theta!r}")
        if not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be a RopeScaling or an object, got {self.rope_scaling!r}")
        if not isinstance(self.arch, str) or self.arch not in ARCHS:
            raise ConfigError(f"unsupported architecture {self.arch!r}: minift supports {', '.join(ARCHS)}")
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        if not is_int(K) or K <= 0 or H % K != 0:
            raise ConfigError(
                f"n_kv_heads (K={K}) must be a positive divisor of n_heads (H={H}): "
                "each key/value head serves H // K query heads"
            )
        if not is_int(D) or D <= 0:
            raise ConfigError(f"head_dim must be a positive integer, got {D!r}")
        if self.uses_rope and D % 2 != 0:
            raise ConfigError(f"RoPE rotates pairs (i, i + D/2): head_dim must be even, got {D}")
        if self.arch == "gpt2":
            if K != H:
                raise ConfigError("GPT-2 has no grouped-query attention: n_kv_heads must equal n_heads")
            if self.hidden_size != H * D:
                raise ConfigError("GPT-2 needs n_heads * head_dim == hidden_size")
            if not (self.qkv_bias and self.o_bias and self.mlp_bias):
                raise ConfigError("GPT-2 has biases on every projection: set qkv_bias, o_bias, mlp_bias")
        self._validate_windows()
        self._validate_gemma()
        if self.norm_eps < 0:
            raise ConfigError(f"norm_eps must be >= 0, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        ids = [("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)]
        ids += [("eos_token_id", e) for e in self.eos_token_id]
        for name, tok in ids:
            if tok is not None and not is_int(tok):
                raise ConfigError(f"{name} must be an integer token id, got {tok!r}")
            if tok is not None and (tok < 0 or tok >= self.vocab_size):
                raise ConfigError(f"{name}={tok} is outside the vocabulary [0, {self.vocab_size})")

    def _validate_windows(self) -> None:
        W = self.sliding_window
        if W is not None and (type(W) is not int or W <= 0):
            raise ConfigError(f"sliding_window must be a positive integer or null, got {W!r}")
        if self.layer_types:
            if len(self.layer_types) != self.n_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers"
                )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ConfigError(f"unsupported layer_types {bad}: minift supports {', '.join(LAYER_TYPES)}")
            if W is None and "sliding_attention" in self.layer_types:
                raise ConfigError("layer_types has sliding_attention layers but sliding_window is null")
        if self.arch == "gpt2" and (W is not None or self.qk_norm):
            raise ConfigError("GPT-2 has neither a sliding window nor q/k norms")

    def _validate_gemma(self) -> None:
        s, local = self.query_pre_attn_scalar, self.rope_local_theta
        if s is not None and not (is_finite(s) and F32_TINY <= s <= F32_MAX):
            raise ConfigError(f"query_pre_attn_scalar must be a positive number float32 holds, got {s!r}")
        if local is not None and not (is_finite(local) and F32_TINY <= local <= F32_MAX):
            raise ConfigError(f"rope_local_theta must be a positive number float32 holds, got {local!r}")
        if self.arch == "gemma3" and not self.qk_norm:
            raise ConfigError("Gemma 3 has q/k norms in every layer: qk_norm must be true")
        if self.arch == "gpt2" and (s is not None or local is not None):
            raise ConfigError("GPT-2 has neither query_pre_attn_scalar nor rope_local_theta")

    def window(self, layer: int) -> int | None:
        """The sliding-window width of one layer, or None where it attends to every past position."""
        if self.layer_types:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        return self.sliding_window

    def rope(self, layer: int) -> tuple[float, RopeScaling]:
        """The RoPE base θ and scaling of one layer: sliding-window layers of a config with
        ``rope_local_theta`` rotate by that base, unscaled; every other layer by rope_theta, rope_scaling."""
        if self.rope_local_theta is not None and self.window(layer) is not None:
            return self.rope_local_theta, RopeScaling()
        return self.rope_theta, self.rope_scaling

    @property
    def attention_scale(self) -> float:
        """The factor of q·k before the softmax: 1/√query_pre_attn_scalar (Gemma 3), else 1/√D."""
        assert self.head_dim is not None
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def gemma(self) -> bool:
        """Gemma 3's block: (1 + w) norms, √C-scaled embeddings, GeGLU, norms after attention and MLP."""
        return self.arch == "gemma3"

    @property
    def uses_rope(self) -> bool:
        """Llama-family models rotate q and k; GPT-2 adds a learned position embedding instead."""
        return self.arch != "gpt2"

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head, H // K."""
        assert self.n_kv_heads is not None
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (minift's own format; ``minift.io.hub`` writes the HF one)."""
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are an error that names them."""
        _reject_unknown_keys(cls, d, "ModelConfig")
        d = dict(d)
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling.from_dict(d["rope_scaling"])
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"invalid ModelConfig: {e}") from None
