"""minift's adapters against Hugging Face PEFT (its folder format and its PiSSA/SORSA initialisation).

On tiny random transformers models written by ``save_pretrained`` and read by ``minift.io.hub``:
- every adapter minift exports (LoRA, LoRA with rsLoRA on some layers, PiSSA and SORSA as rank-2r
  LoRA) loads with ``PeftModel.from_pretrained`` with no warning (a missing-key warning would fail:
  pytest turns warnings into errors), PEFT holds exactly the tensors written, and PEFT's logits equal
  minift's adapted model (max abs ≤ 1e-4) at every real position of a left-padded batch;
- minift's PiSSA init equals PEFT's ``init_lora_weights="pissa"`` on the same weights, factors up to
  the signs of singular vectors, residual base weights included.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from minift.io.hub import load_pretrained  # noqa: E402
from minift.io.peft import WEIGHTS_NAME, export_peft_adapter, hf_module  # noqa: E402
from minift.io.safetensors_io import read_safetensors  # noqa: E402
from minift.methods.lora import LoRAConfig, apply_lora, low_rank_slots  # noqa: E402
from minift.methods.pissa import PiSSAConfig, apply_pissa  # noqa: E402
from minift.methods.sorsa import SORSAConfig, apply_sorsa  # noqa: E402
from minift.model import model_forward  # noqa: E402
from minift.testing import assert_close  # noqa: E402
from tests.adapters import perturb  # noqa: E402
from tests.crosscheck.make_fixtures import batch, build_hf_model  # noqa: E402

pytestmark = pytest.mark.crosscheck

ALL = ("q", "k", "v", "o", "gate", "up", "down")
CASES = {
    "lora": ("llama_gqa_llama3", lambda m, rng: apply_lora(m, LoRAConfig(r=4, alpha=8.0, targets=ALL), rng)),
    "lora-rslora-some-layers": ("qwen2", lambda m, rng: apply_lora(
        m, LoRAConfig(r=2, alpha=3.0, use_rslora=True, targets=("q", "v", "down"), layers=(1,)), rng)),
    "pissa": ("llama_gqa_llama3",
              lambda m, rng: apply_pissa(m, PiSSAConfig(r=4, alpha=8.0, targets=ALL), rng)),
    "sorsa": ("mistral_head_dim", lambda m, rng: apply_sorsa(m, SORSAConfig(r=3), rng)),
    "lora-qwen3-window": ("qwen3_window",
                          lambda m, rng: apply_lora(m, LoRAConfig(r=2, alpha=4.0, targets=ALL), rng)),
    "pissa-mistral-window": ("mistral_window",
                             lambda m, rng: apply_pissa(m, PiSSAConfig(r=2, alpha=4.0, targets=ALL), rng)),
    "lora-gemma3-window": ("gemma3_window",
                           lambda m, rng: apply_lora(m, LoRAConfig(r=2, alpha=4.0, targets=ALL), rng)),
    "sorsa-gemma3-window": ("gemma3_window", lambda m, rng: apply_sorsa(m, SORSAConfig(r=2), rng)),
    "pissa-qwen3-window": ("qwen3_window",
                           lambda m, rng: apply_pissa(m, PiSSAConfig(r=2, alpha=4.0, targets=ALL), rng)),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each base model's folder, written by transformers, built once."""
    folders = {}
    for spec in sorted({spec for spec, _ in CASES.values()}):
        folder = tmp_path_factory.mktemp(spec)
        build_hf_model(spec, seed=3).save_pretrained(folder)
        folders[spec] = folder
    return folders


def _hf_base(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_exported_adapter_and_reproduces_minifts_logits(case, bases, tmp_path):
    spec, apply = CASES[case]
    model = apply(load_pretrained(bases[spec]), np.random.default_rng(0))
    perturb(model, seed=1, scale=0.05)  # trained-looking factors: LoRA's B is no longer zero
    adapter = export_peft_adapter(model, tmp_path / case, base_model_name_or_path=str(bases[spec]))

    peft_model = peft.PeftModel.from_pretrained(_hf_base(bases[spec]), adapter).eval()
    written, _ = read_safetensors(adapter / WEIGHTS_NAME)
    loaded = peft.get_peft_model_state_dict(peft_model)
    assert loaded.keys() == written.keys()
    for key, value in written.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)

    data = batch(seed=2)
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(data["tokens"]),
                            attention_mask=torch.tensor(data["attention_mask"])).logits.numpy()
    ours, _ = model_forward(model, data["tokens"], attention_mask=data["attention_mask"], train=False)
    real = data["attention_mask"] == 1
    assert_close(ours[real], theirs[real], rtol=0, atol=1e-4, what=f"{case} logits")


def _aligned(ours: np.ndarray, theirs: np.ndarray, axis: int) -> np.ndarray:
    """``theirs`` with each rank component's sign flipped to agree with ``ours`` (rows of A, columns of B)."""
    signs = np.sign(np.sum(ours * theirs, axis=1 - axis, keepdims=True))
    return theirs * signs


def test_minifts_pissa_init_equals_pefts_up_to_singular_vector_signs(bases):
    folder = bases["llama_gqa_llama3"]
    config = peft.LoraConfig(r=4, lora_alpha=2.0, init_lora_weights="pissa",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    peft_model = peft.get_peft_model(_hf_base(folder), config)
    modules = dict(peft_model.base_model.model.named_modules())
    model = apply_pissa(load_pretrained(folder), PiSSAConfig(r=4, alpha=2.0, targets=ALL))
    for path, slot in low_rank_slots(model):
        i, name = int(path.split(".")[1]), path.split(".")[2]
        layer = modules[hf_module(i, name)]
        A = layer.lora_A["default"].weight.detach().numpy()
        B = layer.lora_B["default"].weight.detach().numpy()
        assert_close(slot.A, _aligned(slot.A, A, axis=0), rtol=0, atol=1e-4, what=f"{path} lora_A")
        assert_close(slot.B, _aligned(slot.B, B, axis=1), rtol=0, atol=1e-4, what=f"{path} lora_B")
        residual = layer.base_layer.weight.detach().numpy()
        assert_close(slot.weight, residual, rtol=0, atol=1e-5, what=f"{path} residual")
