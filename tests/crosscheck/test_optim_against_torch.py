"""minift.optim against PyTorch and transformers: AdamW, gradient clipping and the three schedules."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from minift.optim import AdamW, Schedule, clip_grad_norm  # noqa: E402
from minift.testing import assert_close  # noqa: E402

pytestmark = pytest.mark.crosscheck


def test_adamw_matches_torch_adamw_step_by_step_with_decay_on_matrices_only():
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((4, 3)), rng.standard_normal(4)
    grads = [(rng.standard_normal((4, 3)), rng.standard_normal(4)) for _ in range(6)]
    lrs = [0.0, 0.02, 0.05, 0.04, 0.03, 0.01]  # a warm-up then decay, changed between steps

    ours = {"w": W.copy(), "b": b.copy()}
    opt = AdamW(ours, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.1)
    tw, tb = torch.tensor(W, requires_grad=True), torch.tensor(b, requires_grad=True)
    topt = torch.optim.AdamW(
        [{"params": [tw], "weight_decay": 0.1}, {"params": [tb], "weight_decay": 0.0}],
        lr=1.0, betas=(0.9, 0.95), eps=1e-7,
    )
    for (gw, gb), lr in zip(grads, lrs, strict=True):
        opt.step({"w": gw, "b": gb}, lr)
        for group in topt.param_groups:
            group["lr"] = lr
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        topt.step()
        assert_close(ours["w"], tw.detach().numpy(), rtol=1e-13, atol=1e-15, what="W")
        assert_close(ours["b"], tb.detach().numpy(), rtol=1e-13, atol=1e-15, what="b")


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_matches_torch_clip_grad_norm(max_norm):
    rng = np.random.default_rng(1)
    grads = {"a": rng.standard_normal((3, 5)), "b": rng.standard_normal(7)}
    tensors = [torch.zeros(3, 5, dtype=torch.float64, requires_grad=True),
               torch.zeros(7, dtype=torch.float64, requires_grad=True)]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = torch.tensor(g)
    theirs = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm))
    ours = clip_grad_norm(grads, max_norm)
    assert ours == pytest.approx(theirs, rel=1e-14)
    for t, g in zip(tensors, grads.values(), strict=True):
        assert_close(g, t.grad.numpy(), rtol=1e-14, what="clipped gradient")


@pytest.mark.parametrize(
    ("kind", "factory"),
    [
        ("constant", "get_constant_schedule_with_warmup"),
        ("linear", "get_linear_schedule_with_warmup"),
        ("cosine", "get_cosine_schedule_with_warmup"),
    ],
)
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_give_the_learning_rate_transformers_uses_at_every_optimizer_step(kind, factory, warmup):
    total, lr = 12, 3e-3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    kwargs = {"num_warmup_steps": warmup} | ({} if kind == "constant" else {"num_training_steps": total})
    sched = getattr(transformers, factory)(opt, **kwargs)
    ours = Schedule(lr, total, kind, warmup)
    for step in range(total):
        assert ours(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18), step
        opt.step()  # the Trainer's order: optimizer step with the current lr, then scheduler step
        sched.step()
