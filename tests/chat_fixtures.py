"""A tiny byte-level BPE tokenizer with the special tokens of real chat templates, and two realistic
templates written out here (ChatML as in SmolLM2, and Llama 3's header/eot format): chat tests need
no download."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# ChatML whose assistant turns are marked with transformers' {% generation %} tag
CHATML_GENERATION = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {
    "chatml": (CHATML, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, "<|im_end|>"),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "<|eot_id|>"),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "user assistant system What is the capital of France? Paris. Reverse abc: cba. Hello there!",
    "The quick brown fox jumps over the lazy dog. 0123456789 {} [] <> & \" ' \n\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Reverse abc"},
     {"role": "assistant", "content": "cba"},
     {"role": "user", "content": "And <xyz> & 'q'?"},
     {"role": "assistant", "content": "zyx \"q\"\n\nDone."}],
]


def tiny_tokenizer(vocab_size: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_chat_tokenizer(folder: Path, kind: str, *, as_jinja_file: bool = False) -> Path:
    """tokenizer.json, tokenizer_config.json (with the template, or the template in
    chat_template.jinja) and generation_config.json in ``folder``."""
    source, special, _ = TEMPLATES[kind]
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "pad_token": "<|endoftext|>"}
    if as_jinja_file:
        (folder / "chat_template.jinja").write_text(source, encoding="utf-8")
    else:
        config["chat_template"] = source
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    eos = tok.token_to_id(special["eos_token"])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}), encoding="utf-8")
    return folder
