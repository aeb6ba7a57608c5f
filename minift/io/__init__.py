"""File formats: what minift reads and writes on disk, apart from the mathematics.

- ``safetensors_io``: the safetensors container (header checks, float conversion);
- ``jsonio``: the JSON objects beside models, adapters and checkpoints;
- ``hub``: Hugging Face model folders in and out;
- ``peft``: PEFT LoRA adapter folders;
- ``checkpoint``: training checkpoints (weights, optimizer state, RNG), written atomically.

``safetensors_io`` and ``jsonio`` know nothing of models; ``hub``, ``peft`` and ``checkpoint`` build
on the model and the methods.
"""
