"""minift against transformers/PyTorch: the same checkpoints, the same numbers.

For every tiny random model of ``make_fixtures.SPECS`` (Llama with GQA and llama3 RoPE, Llama with
attention and MLP biases and a tied head, Qwen2, Mistral with head_dim ≠ C/H, Mistral and Qwen3 with
sliding windows shorter than the batch, Qwen3's q/k norms, GPT-2), written by
transformers' ``save_pretrained`` and read by ``minift.io.hub.load_pretrained``:
- logits agree to 1e-4 (max abs) on a left-padded batch, at every real position;
- the loss and the gradient of every parameter agree with torch autograd to relative error 1e-4;
- greedy generation of 32 tokens is identical;
- the model saved back by minift loads in transformers with the same logits;
- a sharded checkpoint and a bf16 checkpoint written by transformers load as transformers reads them;
- a multimodal Gemma 3 folder (Gemma3ForConditionalGeneration) loads as its text decoder, with the
  logits transformers computes on text.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from minift.generate import generate  # noqa: E402
from minift.io.hub import load_pretrained, model_state, save_pretrained, to_hf_tensors  # noqa: E402
from minift.io.safetensors_io import read_safetensors  # noqa: E402
from minift.model import loss_and_grads, model_forward, set_trainable  # noqa: E402
from minift.testing import assert_close  # noqa: E402
from tests.crosscheck.make_fixtures import (  # noqa: E402
    FIXTURE_SPECS,
    FIXTURES,
    SPECS,
    batch,
    build_hf_model,
    hf_greedy,
    hf_reference,
    make_fixture,
    minift_targets,
)

pytestmark = pytest.mark.crosscheck


@pytest.fixture(scope="module", params=list(SPECS))
def case(request, tmp_path_factory):
    """(name, transformers model, its folder, the minift model loaded from that folder)."""
    name = request.param
    hf = build_hf_model(name, seed=list(SPECS).index(name))
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    return name, hf, folder, load_pretrained(folder)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def test_minift_logits_match_transformers_on_a_left_padded_batch(case):
    _, hf, _, model = case
    data = batch()
    ref = hf_reference(hf, data)
    logits, _ = model_forward(model, data["tokens"], attention_mask=data["attention_mask"], train=False)
    real = data["attention_mask"] == 1  # padding queries are never read; HF and minift fill them differently
    assert_close(logits[real], ref["logits"][real], rtol=0, atol=1e-4, what="logits")


def test_loss_and_every_parameter_gradient_match_torch_autograd(case):
    _, hf, _, model = case
    data = batch(seed=1)
    ref = hf_reference(hf, data)
    set_trainable(model, True)
    try:
        loss, grads = loss_and_grads(model, data["tokens"], minift_targets(data["labels"]),
                                     attention_mask=data["attention_mask"])
    finally:
        set_trainable(model, False)
    assert abs(loss - float(ref["loss"])) <= 1e-4 * abs(float(ref["loss"]))
    ours = to_hf_tensors(model.config, grads)  # GPT-2: q, k, v fused and transposed as c_attn
    theirs = {k.removeprefix("grad."): v for k, v in ref.items() if k.startswith("grad.")}
    assert ours.keys() == theirs.keys()
    errors = {k: relative_error(ours[k], theirs[k]) for k in theirs}
    assert max(errors.values()) <= 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_greedy_generation_of_32_tokens_is_identical(case):
    _, hf, _, model = case
    prompt = batch()["tokens"][0, :6]
    ours = generate(model, [prompt.tolist()], max_new_tokens=32, eos_ids=[])[0]
    assert ours == hf_greedy(hf, prompt, 32)


def test_a_model_saved_by_minift_loads_in_transformers_with_the_same_logits(case, tmp_path):
    _, _, _, model = case
    folder = save_pretrained(model, tmp_path / "minift")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tokens = batch()["tokens"][:1]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    ours, _ = model_forward(model, tokens, train=False)
    assert_close(ours, theirs, rtol=0, atol=1e-4, what="logits of the minift-saved model")


def test_a_sharded_checkpoint_written_by_transformers_loads_like_the_single_file(case, tmp_path):
    _, hf, _, model = case
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = load_pretrained(tmp_path)
    for key, a in model_state(model).items():
        np.testing.assert_array_equal(model_state(sharded)[key], a, err_msg=key)


def test_a_bf16_checkpoint_loads_exactly_as_torch_widens_it(tmp_path):
    hf = build_hf_model("qwen2")
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    widened = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    model = load_pretrained(tmp_path)
    ours = to_hf_tensors(model.config, model_state(model))
    assert ours.keys() <= widened.keys()
    for key, a in ours.items():
        np.testing.assert_array_equal(a, widened[key], err_msg=key)


def test_the_committed_fixtures_are_what_transformers_computes_today(tmp_path):
    """make_fixtures.py, rerun now, reproduces the committed expected values (fixtures are not stale)."""
    for name, dtype in FIXTURE_SPECS.items():
        make_fixture(name, dtype, tmp_path / name)
        fresh, _ = read_safetensors(tmp_path / name / "expected.safetensors")
        committed, _ = read_safetensors(FIXTURES / name / "expected.safetensors")
        assert fresh.keys() == committed.keys()
        for key in fresh:
            assert_close(fresh[key], committed[key], rtol=1e-4, atol=1e-5, what=f"{name} {key}")


def test_a_multimodal_gemma3_folder_loads_its_decoder_with_transformers_text_logits(tmp_path):
    text = SPECS["gemma3_window"][2] | dict(vocab_size=64, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=63, boi_token_index=61, eoi_token_index=62,
                                       attn_implementation="eager")
    gen = torch.Generator().manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    data = batch()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(data["tokens"]),
                    attention_mask=torch.tensor(data["attention_mask"])).logits.numpy()
    ours, _ = model_forward(model, data["tokens"], attention_mask=data["attention_mask"], train=False)
    real = data["attention_mask"] == 1
    assert_close(ours[real], theirs[real], rtol=0, atol=1e-4, what="text logits of the multimodal model")
