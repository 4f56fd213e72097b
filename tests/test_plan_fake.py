"""`trainer plan --measure`: a step measured on fake tensors against the memory formula, and the layouts it refuses."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

from plan_accuracy import SIZE, config_of

from trainer.build import resolve_model
from trainer.errors import UserError
from trainer.plan.fake import measure_fake
from trainer.plan.memory import Layout, estimate

TOK = SimpleNamespace(vocab_size=SIZE["vocab_size"], eos_id=0, cls_id=1, sep_id=2, mask_id=3)


def test_fake_step_matches_the_formula_and_refuses_deepspeed():
    """The table's small GPT under FSDP ZeRO-3 on 2 simulated ranks peaks within 10% of the formula (on real ranks
    the two agree to the byte: bench/plan_accuracy.py); DeepSpeed is refused in one line."""
    cfg = config_of("gpt", ["parallel.engine=fsdp", "parallel.zero_stage=3"])
    model_cfg = resolve_model(cfg, TOK)
    measured = measure_fake(cfg, model_cfg, world=2)
    predicted = estimate(model_cfg, Layout.from_config(cfg, 2), SIZE["seq"])
    assert abs(measured["peak"] / predicted.peak - 1) <= 0.10, (measured, predicted.peak)
    assert measured["parameters"] == predicted.parameters

    ds = config_of("gpt", ["parallel.engine=deepspeed", "parallel.zero_stage=2"])
    with pytest.raises(UserError, match="--measure covers fsdp and ddp"):
        measure_fake(ds, resolve_model(ds, TOK), world=2)
