"""The errors a user can cause. Each message names the file, key or line and says what was expected."""


class MinIFTError(Exception):
    """Base class of every error minift raises for bad input (never for its own bugs)."""


class ConfigError(MinIFTError, ValueError):
    """A model or method configuration is invalid or unsupported."""


class CheckpointError(MinIFTError):
    """A checkpoint, adapter or safetensors file is missing, corrupt or does not match the model."""


class DataError(MinIFTError):
    """A data file or data line is malformed."""


class ShapeError(MinIFTError, ValueError):
    """Arrays given to a public function have incompatible shapes."""


class TrainingError(MinIFTError):
    """Training cannot continue (non-finite loss or gradients)."""
