"""The recipes of the shipped base models: ``minift pretrain`` reruns them.

Two models are shipped, both trained on the same pretraining mix of ``minift.data.tasks``:

- ``base`` (``minift/assets/base``), the tutorials' model: C=128, 4 query heads of D=32;
- ``study`` (``minift/assets/study_base``), the model ``minift study`` measures the papers on: the same
  width with 8 query heads of D=16 (one head is 1/8 of an attention output, so S2FT can split its budget
  between heads and channels as the paper does), trained longer (see ``STUDY_CONFIG``, ``RECIPES``).

The tutorials' base is a small Llama with grouped-query attention (C=128, L=4, H=4 query heads
sharing K=2 key/value heads, F=344, a 100-character vocabulary; 0.75 M parameters, 3 MB in float32),
trained from a seeded random
initialisation on the pretraining mix of ``minift.data.tasks`` by minift's own loop (``minift.train``,
AdamW, cosine schedule), then saved in Hugging Face format with ``minift.io.hub.save_pretrained``.

The run is deterministic under its seed: the corpus, the initial weights and the batch order are
functions of ``PretrainRecipe.seed``, and ``pretrain_single_threaded`` (what ``minift pretrain`` runs)
trains in a process with one BLAS thread, so the floating-point sums do not depend on the machine.
The held-out prompts of ``pretrain_heldout(seed, n_heldout)`` never appear in the corpus.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minift.backend import single_threaded_blas_children
from minift.config import ModelConfig
from minift.data.datasets import BatchStream, encode_example
from minift.data.tasks import (
    PAD,
    SPECIALS,
    evaluate,
    pretrain_heldout,
    pretrain_stream,
    save_tokenizer,
    task_tokenizer,
)
from minift.io.atomic import write_file_atomic
from minift.io.hub import load_pretrained, save_pretrained
from minift.model import Model, init_model, set_trainable
from minift.train import TrainConfig, TrainResult, train

EMBEDDED = Path(__file__).parents[1] / "assets" / "base"  # the shipped model folder
STUDY_EMBEDDED = Path(__file__).parents[1] / "assets" / "study_base"  # the study's base model

BASE_CONFIG = ModelConfig(
    vocab_size=len(SPECIALS) + 96,  # the specials and the 96 characters of tasks.CHARSET
    hidden_size=128,
    intermediate_size=344,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,  # grouped-query attention: two query heads per key/value head
    arch="llama",
    norm_eps=1e-6,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=(2,),
    pad_token_id=SPECIALS.index(PAD),
)


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that determines the base model. The defaults made the shipped one."""

    seed: int = 0
    steps: int = 2500  # optimizer steps of ``batch_size`` examples
    batch_size: int = 64
    # Examples drawn from the pretraining stream; None: steps × batch_size, every example seen once.
    # Revisiting a smaller corpus lets the model memorise string reversal instead of learning it.
    corpus_size: int | None = None
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    n_heldout: int = 50  # held-out prompts per algorithmic skill, excluded from the corpus
    init_std: float = 0.02


# The study's base: the same width, FFN, depth and key/value width (K·D = 64) as BASE_CONFIG, so the
# two have the same parameter count and cost per step; only the split into heads differs. H=8 query
# heads of D=16 make one head 1/8 of O's input (the tutorials' base: 1/4), fine enough for S2FT to give
# half its budget to heads and half to channels. K=4 keeps grouped-query attention at two query heads
# per key/value head like BASE_CONFIG (K=2 would halve the key/value width, 32, and with it the room
# for the new attention routing a fine-tuning task such as ``min`` has to learn in Q/K/V).
STUDY_CONFIG = dataclasses.replace(BASE_CONFIG, n_heads=8, n_kv_heads=4, head_dim=16)


@dataclass(frozen=True)
class NamedRecipe:
    """A shipped model: its architecture, its pretraining recipe and the folder it ships in."""

    config: ModelConfig
    recipe: PretrainRecipe
    folder: Path


RECIPES: dict[str, NamedRecipe] = {
    "base": NamedRecipe(BASE_CONFIG, PretrainRecipe(), EMBEDDED),
    # 4000 steps of 64 examples: 256,000 examples, so a study fine-tuning run (≤ 600 steps of 16, 9,600
    # examples) is < 4% of what the model saw in pretraining, as a fine-tuning set is small for an LLM.
    "study": NamedRecipe(STUDY_CONFIG, PretrainRecipe(steps=4000), STUDY_EMBEDDED),
}


def load_embedded() -> Model:
    """The shipped base model (float32 NumPy)."""
    return load_pretrained(EMBEDDED)


def load_study_base() -> Model:
    """The shipped base model of ``minift study`` (``RECIPES["study"]``, float32 NumPy)."""
    return load_pretrained(STUDY_EMBEDDED)


def pretrain(
    recipe: PretrainRecipe,
    out_dir: str | Path,
    *,
    config: ModelConfig = BASE_CONFIG,
    eval_every: int = 500,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[Model, TrainResult]:
    """Train a model of architecture ``config`` by ``recipe`` and save it (with its tokenizer) as a
    Hugging Face folder.

    Every ``eval_every`` steps the exact match on 10 held-out prompts per skill is shown. The folder also
    gets ``pretrain_recipe.json``: the recipe and the final held-out accuracy per skill.
    """
    tokenizer = task_tokenizer()
    model = set_trainable(init_model(config, np.random.default_rng(recipe.seed), std=recipe.init_std))
    n = recipe.steps * recipe.batch_size if recipe.corpus_size is None else recipe.corpus_size
    corpus = itertools.islice(pretrain_stream(recipe.seed, recipe.n_heldout), n)
    examples = [encode_example(tokenizer, ex.record) for ex in corpus]
    data = BatchStream(examples, recipe.batch_size, tokenizer.pad_id, seed=recipe.seed)
    probe = pretrain_heldout(recipe.seed, 10)
    config = TrainConfig(
        steps=recipe.steps,
        lr=recipe.lr,
        schedule="cosine",
        warmup_steps=recipe.warmup_steps,
        betas=recipe.betas,
        weight_decay=recipe.weight_decay,
        max_grad_norm=1.0,
        seed=recipe.seed,
        eval_every=eval_every,
        checkpoint_every=500 if checkpoint_dir else 0,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        progress=progress,
    )
    result = train(model, data, config, eval_fn=lambda m, step: evaluate(m, tokenizer, probe), resume=resume)
    heldout = evaluate(model, tokenizer, pretrain_heldout(recipe.seed, recipe.n_heldout))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, out_dir, tokenizer_path=save_tokenizer(tmp))
    record = {"recipe": dataclasses.asdict(recipe), "heldout_exact_match": heldout, "steps": result.steps}
    write_file_atomic(folder / "pretrain_recipe.json", (json.dumps(record, indent=2) + "\n").encode())
    return model, result


def _pretrain_steps(recipe: PretrainRecipe, out_dir: str, options: dict[str, Any]) -> int:
    return pretrain(recipe, out_dir, **options)[1].steps


def pretrain_single_threaded(recipe: PretrainRecipe, out_dir: str | Path, **options: Any) -> int:
    """``pretrain`` in a spawned process with one BLAS thread; returns the step count reached.

    Threads would only contend on these small matrices, and a fixed thread count keeps the weights
    bitwise reproducible from one machine to the next.
    """
    with (
        single_threaded_blas_children(),
        ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool,
    ):
        return pool.submit(_pretrain_steps, recipe, str(out_dir), options).result()
