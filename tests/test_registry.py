"""The method registry is the one place a method is added: a toy method registered there is offered by
the command line and measured by the bench, without touching either."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from minift.errors import ConfigError
from minift.methods import MethodRecord, method_record, record_method
from minift.methods.registry import REGISTRY, MethodSpec, get_method, register
from minift.model import Model, set_trainable, trainable_parameters
from minift.tools import bench
from minift.tools.cli import build_parser


@dataclass(frozen=True)
class HeadOnlyConfig:
    """Train the final norm only: a method small enough to write in a test."""


def apply_head_only(model: Model, config: HeadOnlyConfig, rng=None, calib=None) -> Model:
    set_trainable(model, False)
    model.final_norm.requires_grad = True
    record_method(model, MethodRecord("head-only", config))
    return model


@pytest.fixture
def toy() -> Iterator[str]:
    method = replace(
        get_method("full"), name="head-only", label="head only", summary="the final norm only",
        Config=HeadOnlyConfig, apply=apply_head_only, configure=lambda spec, c: HeadOnlyConfig(),
    )
    register(method)
    try:
        yield method.name
    finally:
        del REGISTRY[method.name]


def test_a_registered_method_is_offered_by_the_command_line(toy):
    args = build_parser().parse_args(["finetune", "--data", "d.jsonl", "--method", toy, "--out", "o"])
    assert args.method == toy
    assert build_parser().parse_args(["bench", "--methods", toy, "lora"]).methods == [toy, "lora"]
    assert build_parser().parse_args(["demo", "--methods", toy]).methods == [toy]


def test_a_registered_method_is_measured_by_the_bench(toy):
    model, hooks = bench.prepare_model(toy, bench.QUICK, seed=0)
    assert method_record(model).name == toy
    assert set(trainable_parameters(model)) == {"final_norm.weight"}
    assert hooks == []
    step, _ = bench.minift_step(toy, bench.QUICK, seed=0)
    step()


def test_an_unregistered_method_is_refused_everywhere():
    with pytest.raises(ConfigError, match="unknown fine-tuning method 'dora'"):
        MethodSpec("dora")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--data", "d.jsonl", "--method", "dora", "--out", "o"])


def test_a_name_is_registered_once():
    with pytest.raises(ConfigError, match="already registered"):
        register(get_method("lora"))
