"""Hostile-input fuzzing of every file format and command line minift reads.

One template artifact per format is built once (a model folder, a sharded one, a GPT-2 one, a tokenizer
folder, PEFT and S2FT adapters, a training checkpoint, a JSONL file); a case copies it, applies one
mutation to one of its files and loads it again. The outcome is one of

    error     a MinIFTError subclass (the promise)
    same      loaded, and every number equals the template's
    changed   loaded to other numbers after a well-typed edit (a legitimate change of setting)
    crash     any other exception escaped
    accepted  an ill-typed or non-JSON value (NaN, a bool for an int, "2", a huge number, ...) loaded
              and changed the result: a silent mis-load

``run_case`` is shared by ``tests/test_fuzz_formats.py`` (Hypothesis, a few examples per format in CI)
and ``tests/fuzz_many.py`` (thousands of cases, with a per-case time limit for hangs).
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minift.data.tokenizer import UnknownTokenWarning
from minift.errors import MinIFTError

# ----------------------------------------------------------------------------------------------------
# templates


def _tokenizer_folder(folder: Path) -> Path:
    from tests.toy import char_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    char_tokenizer().hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}, "pad_token": "<pad>"}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2]}))
    return folder


def _tiny(arch: str = "llama", seed: int = 0):
    from minift.config import ModelConfig
    from minift.model import init_model

    if arch == "gpt2":
        config = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=16, n_layers=2, n_heads=2,
                             arch="gpt2", max_position_embeddings=16, tie_word_embeddings=True,
                             qkv_bias=True, o_bias=True, mlp_bias=True, eos_token_id=2, bos_token_id=1)
    else:
        config = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=12, n_layers=2, n_heads=2,
                             n_kv_heads=1, rope_scaling={"kind": "llama3", "factor": 8.0},
                             eos_token_id=2, bos_token_id=1, pad_token_id=0)
    return init_model(config, np.random.default_rng(seed), std=0.5)


def build_templates(root: Path) -> dict[str, Path]:
    """Every format's template artifact under ``root``: format name → folder (or file)."""
    from minift.io.checkpoint import save_checkpoint
    from minift.io.hub import save_pretrained
    from minift.io.peft import export_peft_adapter
    from minift.io.safetensors_io import read_safetensors, write_safetensors
    from minift.methods import s2ft
    from minift.methods.lora import LoRAConfig, apply_lora
    from minift.model import set_trainable, trainable_parameters
    from minift.optim import AdamW

    root.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer_folder(root / "tok")
    out = {"tokenizer": tok}
    out["llama"] = save_pretrained(_tiny(), root / "llama", tokenizer_path=tok / "tokenizer.json")
    out["gpt2"] = save_pretrained(_tiny("gpt2"), root / "gpt2")
    sharded = save_pretrained(_tiny(), root / "sharded")
    tensors, meta = read_safetensors(sharded / "model.safetensors")
    weight_map = {}
    for k in range(2):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        part = {n: tensors[n] for n in sorted(tensors)[k::2]}
        write_safetensors(sharded / shard, part, metadata=meta)
        weight_map |= dict.fromkeys(part, shard)
    (sharded / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    out["sharded"] = sharded

    rng = np.random.default_rng(1)
    lora = apply_lora(_tiny(), LoRAConfig(r=2, alpha=3.0), rng)
    for a in trainable_parameters(lora).values():
        a[...] = rng.normal(0, 0.5, a.shape)
    out["peft"] = export_peft_adapter(lora, root / "peft")

    model = s2ft.apply_s2ft(_tiny(), s2ft.S2FTConfig(heads=1, channels=3), rng=np.random.default_rng(2))
    for a in trainable_parameters(model).values():
        a[...] += rng.normal(0, 0.5, a.shape).astype(a.dtype)
    out["s2ft"] = s2ft.save_adapter(s2ft.extract_adapter(model), root / "s2ft")

    model = set_trainable(_tiny(), True)
    opt = AdamW(trainable_parameters(model))
    for a in opt.state_arrays().values():
        a[...] = rng.normal(0, 1, a.shape)
    opt.t = 3
    ckpt_rng = np.random.default_rng(5)
    ckpt_rng.random(7)
    out["checkpoint"] = save_checkpoint(root / "run", model, opt, step=3, rng=ckpt_rng,
                                        train_config={"lr": 0.1})
    data = root / "data.jsonl"
    data.write_text('{"prompt": "ab=", "completion": "ba"}\n{"text": "abcd"}\n', encoding="utf-8")
    out["jsonl"] = data
    return out


# ----------------------------------------------------------------------------------------------------
# loaders: each returns a fingerprint of everything loaded (arrays and values)


def _load_model(folder: Path) -> Any:
    from minift.io.hub import load_pretrained, model_state
    from minift.model import model_forward

    model = load_pretrained(folder)
    tokens = np.array([[1, 3, 4, 5, 2, 7]])
    return [model.config.to_dict(), model.meta.get("sliding_window"), model_state(model),
            model_forward(model, tokens)[0]]


def _load_tokenizer(folder: Path) -> Any:
    from minift.data import Tokenizer

    tok = Tokenizer.from_pretrained(folder)
    return [tok.eos_ids, tok.bos_id, tok.pad_id, tok.encode("ab=c"), tok.vocab_size]


def _load_peft(folder: Path) -> Any:
    from minift.io.hub import model_state
    from minift.io.peft import load_peft_adapter

    return model_state(load_peft_adapter(_tiny(), folder))


def _load_s2ft(folder: Path) -> Any:
    from minift.io.hub import model_state
    from minift.methods.s2ft import load_adapter
    from minift.serving import merge_adapter

    model = _tiny()
    adapter = load_adapter(folder)
    merge_adapter(model, adapter)
    return [adapter.signature, model_state(model)]


def _load_checkpoint(folder: Path) -> Any:
    from minift.io.checkpoint import load_checkpoint, restore_checkpoint
    from minift.model import set_trainable, trainable_parameters
    from minift.optim import AdamW

    model = set_trainable(_tiny(), True)
    opt = AdamW(trainable_parameters(model))
    rng = np.random.default_rng(123)
    ckpt = load_checkpoint(folder.parent)
    restore_checkpoint(ckpt, model, opt, rng)
    # (train_config is the run's record, compared with the resumed run's settings by train(), not here)
    return [ckpt.step, opt.t, trainable_parameters(model), opt.state_arrays(), rng.random(4)]


def _load_jsonl(path: Path) -> Any:
    from minift.data.datasets import encode_example, read_jsonl
    from tests.toy import char_tokenizer

    tok = char_tokenizer()
    return [encode_example(tok, r) for r in read_jsonl(path)]


@dataclass(frozen=True)
class Format:
    load: Callable[[Path], Any]
    files: tuple[str, ...]  # the files a mutation may hit (relative to the artifact; "" = the file)


FORMATS: dict[str, Format] = {
    "llama": Format(_load_model, ("config.json", "generation_config.json", "model.safetensors")),
    "gpt2": Format(_load_model, ("config.json", "generation_config.json", "model.safetensors")),
    "sharded": Format(_load_model, ("model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                    "config.json")),
    "tokenizer": Format(_load_tokenizer, ("tokenizer_config.json", "generation_config.json",
                                          "tokenizer.json")),
    "peft": Format(_load_peft, ("adapter_config.json", "adapter_model.safetensors")),
    "s2ft": Format(_load_s2ft, ("adapter.json", "adapter.safetensors")),
    "checkpoint": Format(_load_checkpoint, ("state.json", "trainable.safetensors",
                                            "optimizer.safetensors", "../latest")),
    "jsonl": Format(_load_jsonl, ("",)),
}


# ----------------------------------------------------------------------------------------------------
# mutations


class Invalid:
    """Marks a mutated value that no reader may accept (outside JSON, or of the wrong type)."""


_ALWAYS_INVALID_TEXT = [  # raw JSON text for a value; never valid anywhere
    "NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "-" + "9" * 400, "[" * 5000 + "]" * 5000,
    '"\\ud800"', '"\\udfff x"',
]
_VALUES = [  # well-formed JSON values of every type, edge cases included
    0, 1, -1, 2, 7, 8, 100, 2**31, 2**32, 2**63, 2**64, 10**30, -(2**63), 0.0, -0.0, 0.5, 1.5, 100.7,
    1e-300, 1e300, 5e-324, True, False, None, "", "2", "0", "false", "true", "nan", "²", "٠", "١٢",
    "llama", "gpt2", "F32", "I32", "BF16", "../x", "/etc/passwd", "model.safetensors", "x" * 1000,
    [], [0], [1, 2], [2, 2], [-1], [True], ["2"], [2**64], [[1]], [1.5], {}, {"a": 1},
    {"rope_type": "linear"},
]


def _type_of(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict",
            type(None): "null"}[type(v)]


def _well_typed(old: Any, new: Any, path: tuple = ()) -> bool:
    """Whether ``new`` may legitimately replace ``old`` (same JSON type; an integer for a float; null
    for anything, meaning the default; an id or a list of ids for eos_token_id; anything inside a
    checkpoint's train_config, a free-form record)."""
    if new is None or old is None or "train_config" in path:  # (null: the type is not known)
        return True
    ids = new if isinstance(new, list) else [new]
    if path and path[-1] == "eos_token_id" and all(type(i) is int for i in ids):
        return True
    if _type_of(old) == _type_of(new):
        return True
    return isinstance(old, float) and _type_of(new) == "int"


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out += _paths(v, (*prefix, i))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(obj, path[:-1])[path[-1]] = value
    return obj


_MARK = "\x00MARK\x00"


def mutate_json_text(text: str, r: random.Random) -> tuple[str, bool, str]:
    """(new text, whether it is invalid for sure, description) for one mutation of a JSON document."""
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    op = r.random()
    if doc is None or op < 0.12:  # raw text damage
        kind = r.choice(["truncate", "byte", "dupkey", "empty"])
        if kind == "truncate":
            return text[: r.randrange(len(text) + 1)], False, "truncate"
        if kind == "byte":
            i = r.randrange(len(text) + 1)
            return text[:i] + chr(r.choice([0, 0x22, 0x5B, 0x7B, 0x7D, 0xFF, 0xD7FF, r.randrange(32, 127)])) \
                + text[i:], False, "insert char"
        if kind == "dupkey" and text.lstrip().startswith("{") and doc:
            k = r.choice(list(doc))
            return "{" + json.dumps(k) + ": " + json.dumps(_VALUES[r.randrange(len(_VALUES))]) + ", " \
                + text.lstrip()[1:], True, f"duplicate key {k!r}"
        return "", False, "empty"
    paths = _paths(doc)
    path = r.choice(paths)
    old = _get(doc, path)
    if op < 0.3 and path:  # delete
        parent = _get(doc, path[:-1])
        del parent[path[-1]]
        return json.dumps(doc), False, f"delete {path}"
    if op < 0.4 and isinstance(old, dict):  # insert an extra key
        key = r.choice(["extra", "use_dora", "layer_replication", "rope_scaling", "head_dim", "x"])
        existed = key in old
        prev = old.get(key)
        new = r.choice(_VALUES)
        old[key] = new
        invalid = existed and not _well_typed(prev, new, (*path, key))
        return json.dumps(doc), invalid, f"insert {(*path, key)}={new!r}"
    if op < 0.55:  # a value no JSON reader may accept
        raw = r.choice(_ALWAYS_INVALID_TEXT)
        doc = _set(doc, path, _MARK)
        return json.dumps(doc).replace(json.dumps(_MARK), raw), True, f"set {path}={raw[:20]}"
    if op < 0.7 and type(old) in (int, float) and not isinstance(old, bool):  # numeric neighbour
        new = r.choice([old + 1, old - 1, -old, old * 2, 0, old + 0.5, float(old), old * 10**20])
        if isinstance(old, int) and isinstance(new, float) and new == int(new) and math.isfinite(new):
            well = False  # 2.0 where 2 was: refused by integer fields
        else:
            well = _well_typed(old, new, path)
        _set(doc, path, new)
        return json.dumps(doc), not well, f"set {path}={new!r}"
    new = copy.deepcopy(r.choice(_VALUES))
    well = _well_typed(old, new, path)
    _set(doc, path, new)
    return json.dumps(doc), not well, f"set {path}={new!r}"


def mutate_safetensors(raw: bytes, r: random.Random) -> tuple[bytes, bool, str]:
    """One mutation of a safetensors file's header (its data bytes are left alone: flipping them is
    a legitimate, undetectable change of weights)."""
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8 : 8 + n].decode(), raw[8 + n :]
    op = r.random()
    if op < 0.15:
        kind = r.choice(["truncate", "prefix", "append"])
        if kind == "truncate":
            return raw[: r.randrange(len(raw))], False, "truncate file"
        if kind == "prefix":
            return struct.pack("<Q", r.choice([0, 1, n - 1, n + 1, 2**63, 2**64 - 1, len(raw)])) + raw[8:], \
                False, "length prefix"
        return raw + b"\x00" * r.randrange(1, 9), False, "append bytes"
    text, invalid, what = mutate_json_text(header, r)
    body = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(body)) + body + data, invalid, "header " + what


def mutate_file(path: Path, r: random.Random) -> tuple[bool, str]:
    """Mutate ``path`` in place; return (invalid for sure, description)."""
    raw = path.read_bytes()
    if path.suffix == ".safetensors":
        new, invalid, what = mutate_safetensors(raw, r)
        path.write_bytes(new)
        return invalid, what
    if path.suffix == ".jsonl":
        lines = raw.decode().split("\n")
        i = r.randrange(len(lines))
        text, invalid, what = mutate_json_text(lines[i] or "{}", r)
        lines[i] = text.replace("\n", " ")
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
        return invalid, f"line {i + 1}: {what}"
    if path.name == "latest":
        new = r.choice(["step-0000000²", "step-٠٠٠٠٠٠٠3", "step-3", "../step-00000003", "", "step-00000003\n",
                        "step-99999999", "\xff", "step--0000003", "step-00000003 x"])
        path.write_bytes(new.encode("utf-8", "surrogateescape") if new != "\xff" else b"\xff")
        return new not in ("step-00000003\n",), f"latest={new!r}"
    if path.name == "tokenizer.json":
        text, _, what = mutate_json_text(raw.decode(), r)
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        return False, what  # the tokenizers library owns this format: any clean outcome will do
    text, invalid, what = mutate_json_text(raw.decode(), r)
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return invalid, what


# ----------------------------------------------------------------------------------------------------
# one case


def same(a: Any, b: Any) -> bool:
    """Exact equality of fingerprints: arrays bit for bit (dtype included), everything else by ==."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    if hasattr(a, "__dict__") and hasattr(b, "__dict__"):
        return type(a) is type(b) and same(vars(a), vars(b))
    return type(a) is type(b) and a == b


def _finite(x: Any) -> bool:
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list | tuple):
        return all(_finite(v) for v in x)
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return bool(np.isfinite(x).all())
    if isinstance(x, float):
        return math.isfinite(x)
    return True


@dataclass
class Outcome:
    kind: str  # error, same, changed, crash, accepted
    what: str  # the mutation
    detail: str = ""


def run_case(templates: dict[str, Path], originals: dict[str, Any], fmt: str, seed: int,
             scratch: Path) -> Outcome:
    """Copy the template of ``fmt`` into ``scratch``, mutate one file, load, classify."""
    r = random.Random(seed)
    src = templates[fmt]
    if scratch.exists():
        shutil.rmtree(scratch)
    if src.is_dir():
        base = src.parent if fmt == "checkpoint" else src
        shutil.copytree(base, scratch)
        target = scratch / src.name if fmt == "checkpoint" else scratch
    else:
        scratch.mkdir(parents=True)
        target = scratch / src.name
        shutil.copyfile(src, target)
    name = r.choice(FORMATS[fmt].files)
    invalid, what = mutate_file((target / name) if name else target, r)
    what = f"{fmt}/{name}: {what}"
    try:
        with warnings.catch_warnings():  # text the (mutated) vocabulary lacks is a warning, not an error
            warnings.simplefilter("ignore", UnknownTokenWarning)
            got = FORMATS[fmt].load(target)
    except MinIFTError as e:
        return Outcome("error", what, str(e))
    except BaseException as e:  # the very thing being counted (a Rust panic is a BaseException)
        if isinstance(e, KeyboardInterrupt | SystemExit) or type(e).__name__ == "Hang":
            raise
        return Outcome("crash", what, f"{type(e).__name__}: {e}"[:300])
    if same(got, originals[fmt]):
        return Outcome("same", what)
    if invalid or not _finite(got):
        return Outcome("accepted", what, "loaded to other numbers" if _finite(got) else "non-finite values")
    return Outcome("changed", what)


def load_originals(templates: dict[str, Path]) -> dict[str, Any]:
    return {fmt: FORMATS[fmt].load(templates[fmt]) for fmt in FORMATS}


# ----------------------------------------------------------------------------------------------------
# the command line


_CLI_VALUES = ["-1", "0", "1", "2", "3", "nan", "inf", "-inf", "1e999", "²", "٣", "", "x", "0.5", "1.5",
               "9" * 40, "-0"]
_CLI_OPTIONS = {
    "generate": ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"],
    "eval": ["--limit", "--seed"],
    "finetune": ["--steps", "--batch-size", "--lr", "--rank", "--alpha", "--dropout", "--gamma", "--heads",
                 "--channels", "--warmup", "--weight-decay", "--seed", "--max-length", "--checkpoint-every"],
    "export": [],
}


def run_cli_case(templates: dict[str, Path], seed: int, scratch: Path) -> Outcome:
    """One command line with hostile numbers and, sometimes, a mutated model, adapter or data file:
    it must exit 0 or 2, print one line on 2, and never raise."""
    import contextlib
    import io

    from minift.tools.cli import main

    r = random.Random(seed)
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)

    def artifact(fmt: str) -> Path:
        src = templates[fmt]
        dst = scratch / fmt
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.mkdir()
            shutil.copyfile(src, dst / src.name)
            dst = dst / src.name
        if r.random() < 0.3:
            name = r.choice(FORMATS[fmt].files)
            mutate_file(dst / name if name else dst, r)
        return dst

    command = r.choice(sorted(_CLI_OPTIONS))
    argv = [command, "--model", str(artifact("llama"))]
    if command == "generate":
        argv += ["--prompt", r.choice(["ab", "", "abcd=" * 3, "zz\u2028"]), "--max-new-tokens", "2"]
    if command == "eval":
        argv += ["--data", str(artifact("jsonl")), "--limit", "2"]
    if command == "finetune":
        argv += ["--data", str(artifact("jsonl")), "--method", r.choice(["lora", "s2ft", "full", "pissa",
                                                                        "sorsa", "dora"]),
                 "--out", str(scratch / "run"), "--steps", "1", "--batch-size", "2", "--rank", "1"]
    if command in ("generate", "eval", "export") and r.random() < 0.7:
        argv += ["--adapter", str(artifact(r.choice(["peft", "s2ft"])))]
    if command == "export":
        argv += [r.choice(["--peft", "--merged"]), str(scratch / "out")]
    options = _CLI_OPTIONS[command]
    for _ in range(r.randrange(3) if options else 0):
        argv.append(f"{r.choice(options)}={r.choice(_CLI_VALUES)}")
    what = "minift " + " ".join(a.replace(str(scratch), "…") for a in argv)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "Hang":
            raise
        return Outcome("crash", what, f"{type(e).__name__}: {e}"[:300])
    text = err.getvalue()
    lines = [line for line in text.splitlines() if line.startswith("minift")]
    if rc not in (0, 2) or "Traceback" in text or (rc == 2 and len(lines) != 1):
        return Outcome("crash", what, f"exit {rc}: {text[-300:]}")
    return Outcome("error" if rc == 2 else "same", what)
