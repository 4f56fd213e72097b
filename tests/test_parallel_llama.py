"""The Llama family (GQA, QK-norm, untied head) under the same layouts as GPT's table, and its mixed precision."""

from __future__ import annotations

import pytest
from conftest import read_metrics
from parity import (
    LLAMA,
    assert_matches,
    assert_tracks_fp32,
    layout_runner,
)

LLAMA_MIXED = {
    f"fsdp_{p}": (2, {"parallel.engine": "fsdp", "train.micro_batch": 2, "train.precision": p})
    for p in ("bf16", "fp16")
}

LLAMA_LAYOUTS = {
    "ddp2_accum2": (2, {"train.micro_batch": 1, "train.grad_accum": 2}),
    "fsdp_zero2_compile": (
        2,
        {"parallel.engine": "fsdp", "parallel.zero_stage": 2, "train.micro_batch": 2, "train.compile": True},
    ),
    "fsdp_zero3_ac_full": (
        2,
        {"parallel.engine": "fsdp", "train.micro_batch": 2, "train.activation_checkpointing": "full"},
    ),
    "tp2_ac_selective": (2, {"parallel.tp": 2, "train.activation_checkpointing": "selective"}),
    "tp2_compile": (2, {"parallel.tp": 2, "train.compile": True}),
    "fsdp2_x_tp2": (4, {"parallel.engine": "fsdp", "parallel.tp": 2, "train.micro_batch": 2}),
    "ds_zero1": (2, {"parallel.engine": "deepspeed", "parallel.zero_stage": 1, "train.micro_batch": 2}),
    "ds_zero2_accum2": (
        2,
        {"parallel.engine": "deepspeed", "parallel.zero_stage": 2, "train.micro_batch": 1, "train.grad_accum": 2},
    ),
    "ds_zero3_offload": (
        2,
        {"parallel.engine": "deepspeed", "parallel.zero_stage": 3, "parallel.offload": "cpu", "train.micro_batch": 2},
    ),
}


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory, corpus, gpt_tok):
    return layout_runner(
        tmp_path_factory.mktemp("llama_layouts"), corpus, gpt_tok, {**LLAMA_LAYOUTS, **LLAMA_MIXED}, **LLAMA
    )


@pytest.mark.parametrize("layout", list(LLAMA_LAYOUTS))
def test_llama_layout_matches_single_process(llama_runs, layout):
    run = llama_runs(layout)
    nproc, overrides = LLAMA_LAYOUTS[layout]
    start = read_metrics(run)[0]
    assert (start["arch"], start["world_size"], start["tp"]) == ("llama", nproc, overrides.get("parallel.tp", 1))
    assert_matches(llama_runs("single"), run, weights_atol=1e-4 if overrides.get("train.compile") else 1e-5)


@pytest.mark.parametrize("layout", list(LLAMA_MIXED))
def test_llama_mixed_precision_tracks_fp32(llama_runs, layout):
    assert_tracks_fp32(llama_runs("single"), llama_runs(layout))
