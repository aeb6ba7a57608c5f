"""S2FT, structured sparse fine-tuning (Yang et al., NeurIPS 2024, arXiv 2412.06289).

"Select sparsely, compute densely": per layer a few attention heads and FFN channels are chosen
(``selection``), co-permuted so that their weights form contiguous blocks (``permute``; grouped-query
attention included), and trained in place through partial-backpropagation slots (``slots``) that
keep only the activations the blocks' gradients need. The update is a decoupled adapter of
(original indices, dense block) pairs (``adapter``), merged, switched, fused and served in batches
by ``minift.serving``.

Cost of one training step (paper Sec. 3.3): every slot still computes dx = dy W (the layers below need
it), but the weight gradient of a column block costs 2·N·S·O instead of 2·N·I·O, frozen slots cost
nothing and keep nothing, and the blocks below the lowest trainable one run in inference mode. The
backward therefore falls from about twice the forward to about once, gradients and AdamW state are
of the blocks' size (3·S·O per matrix instead of 3·I·O), and the O/Down (column) side keeps only an
N×S slice of its input. Table in ``minift.methods.s2ft.slots``.

Typical use::

    model = apply_s2ft(model, S2FTConfig(heads=1, channels=32), rng=np.random.default_rng(0))
    ...train on trainable_parameters(model)...
    adapter = extract_adapter(model)       # original coordinates
    unpermute(model)                       # the merged model, in the original layout
"""

from collections.abc import Sequence

import numpy as np

from minift.methods.s2ft.adapter import AdapterBlock, S2FTAdapter, extract_adapter, load_adapter, save_adapter
from minift.methods.s2ft.apply import apply_s2ft
from minift.methods.s2ft.budget import lora_parameter_count, match_lora_budget, s2ft_parameter_count
from minift.methods.s2ft.config import S2FTConfig
from minift.methods.s2ft.permute import LayerLayout, co_permute, plan_layout, unpermute
from minift.methods.s2ft.selection import CalibBatch, select_units
from minift.methods.s2ft.slots import ColumnBlock, RowBlock
from minift.model import Model

Config = S2FTConfig


def apply(
    model: Model,
    config: S2FTConfig,
    rng: np.random.Generator | None = None,
    calib_batches: Sequence[CalibBatch] | None = None,
) -> Model:
    """The method protocol's ``apply`` (see ``minift.methods``): ``apply_s2ft``."""
    return apply_s2ft(model, config, calib_batches, rng=rng)


def merge(model: Model) -> Model:
    """Nothing to fold: S2FT trains blocks of the weights in place (``unpermute`` restores the
    original coordinates, ``extract_adapter`` gives the sparse update)."""
    return model


unmerge = merge

__all__ = [
    "AdapterBlock",
    "ColumnBlock",
    "Config",
    "LayerLayout",
    "RowBlock",
    "S2FTAdapter",
    "S2FTConfig",
    "apply",
    "apply_s2ft",
    "co_permute",
    "extract_adapter",
    "load_adapter",
    "lora_parameter_count",
    "match_lora_budget",
    "merge",
    "plan_layout",
    "s2ft_parameter_count",
    "save_adapter",
    "select_units",
    "unmerge",
    "unpermute",
]
