"""minift: a pure-NumPy reference implementation of LLM fine-tuning with hand-written backward passes.

Shape alphabet (used in every docstring ``Shapes:`` block and shape comment):

    B batch            T tokens (sequence)      C model width         N = B·T flattened tokens
    H query heads      K key/value heads        D head width          F FFN width
    V vocabulary       R adapter rank           S selected heads/channels
    L layers           P cached (past) positions, or learned-position rows

Conventions:
- weights use PyTorch's ``[out, in]`` layout, as stored in checkpoints: y = x Wᵀ + b;
- ``<op>_forward`` returns ``(y, cache)``; ``<op>_backward(dy, cache, ...)`` returns fresh gradients in
  the order of the forward's differentiable arguments and never accumulates into buffers;
- the array module comes from the arguments (``minift.backend.get_xp``): numpy, or cupy on a GPU;
- float32 by default, float64 for gradient checks; random numbers from an explicit host Generator;
- user errors raise ``minift.errors.MinIFTError`` subclasses naming the file, key or line.
"""

from minift.backend import Array, get_xp
from minift.config import ModelConfig, RopeScaling
from minift.errors import MinIFTError
from minift.model import (
    Model,
    init_model,
    loss_and_grads,
    model_backward,
    model_forward,
    set_trainable,
    trainable_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "Array",
    "MinIFTError",
    "Model",
    "ModelConfig",
    "RopeScaling",
    "__version__",
    "get_xp",
    "init_model",
    "loss_and_grads",
    "model_backward",
    "model_forward",
    "set_trainable",
    "trainable_parameters",
]
