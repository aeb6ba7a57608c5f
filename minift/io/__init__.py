"""File formats: what minift reads and writes on disk, apart from the mathematics.

- ``safetensors_io``: the safetensors container (header checks, float conversion);
- ``jsonio``: strict JSON reading and typed getters, for every JSON file and line minift reads;
- ``atomic``: atomic file writes and whole-folder swaps, for every writer;
- ``hfconfig``: the types and bounds of a Hugging Face config.json and generation_config.json;
- ``hub``: Hugging Face model folders in and out;
- ``peft``: PEFT LoRA adapter folders;
- ``checkpoint``: training checkpoints (weights, optimizer state, RNG), written atomically.

``safetensors_io``, ``jsonio`` and ``atomic`` know nothing of models (``hfconfig`` only of the config's
bounds); ``hub``, ``peft`` and ``checkpoint`` build on the model and the methods.
"""
