"""An S2FT adapter exported as PEFT LoRA (one rank per module) loads in PEFT with no warning, and PEFT's
logits equal those of minift's merged model (relative to the logit scale, ≤ 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from minift.io.hub import load_pretrained  # noqa: E402
from minift.io.provenance import write_provenance  # noqa: E402
from minift.io.s2ft_peft import export_s2ft_as_peft  # noqa: E402
from minift.methods.s2ft import S2FTConfig, apply_s2ft, extract_adapter  # noqa: E402
from minift.model import model_forward  # noqa: E402
from minift.tools.finetune import merged_model  # noqa: E402
from tests.adapters import perturb  # noqa: E402
from tests.crosscheck.make_fixtures import batch, build_hf_model  # noqa: E402

pytestmark = pytest.mark.crosscheck

CASES = {  # GQA (K/V rows of 2 kv heads), every target; and the paper's default O + Down columns
    "all-targets": dict(heads=1, channels=5, head_targets=("q", "k", "v", "o"),
                        channel_targets=("gate", "up", "down")),
    "o-down": dict(heads=2, channels=7),
}


@pytest.mark.parametrize(("case", "spec"), [(case, "llama_gqa_llama3") for case in sorted(CASES)]
                         + [("all-targets", "gemma3_window"), ("all-targets", "qwen3_window")])
def test_peft_reproduces_minifts_merged_s2ft_model(case, spec, tmp_path):
    base = tmp_path / "base"
    build_hf_model(spec, seed=4).save_pretrained(base)
    model = apply_s2ft(load_pretrained(base), S2FTConfig(**CASES[case]), rng=np.random.default_rng(0))
    perturb(model, seed=1, scale=0.05)
    folder = export_s2ft_as_peft(extract_adapter(model), tmp_path / "peft", base_model_name_or_path=str(base))
    write_provenance(folder, base)  # as `minift export` writes it: PEFT must ignore it silently

    hf = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, folder).eval()
    data = batch(seed=2)
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(data["tokens"]),
                            attention_mask=torch.tensor(data["attention_mask"])).logits.numpy()
    merged = merged_model(model)
    ours, _ = model_forward(merged, data["tokens"], attention_mask=data["attention_mask"], train=False)
    real = data["attention_mask"] == 1
    scale = np.abs(ours[real]).max()
    assert np.abs(ours[real] - theirs[real]).max() / scale <= 1e-5
