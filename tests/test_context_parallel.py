"""Context parallelism (`parallel.cp`): every layout at a long sequence (2048 tokens on a tiny model) against one
process (loss, grad norm, validation loss, final weights), the load balance of the sequence split, and the refusals.
The resume across a cp change is in test_parallel.py's stop-and-resume table."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics, run_cli, tiny_config, write_config
from parity import assert_matches, launch, layout_runner

from trainer.parallel.context_parallel import _chunk_positions, block_causal

LONG = {
    "data.seq_len": 2048,
    "model.max_seq_len": 2048,
    "train.steps": 4,
    "train.eval_every": 2,
    "train.sample_tokens": 0,
}
FSDP = {"parallel.engine": "fsdp"}
LLAMA = {"model.arch": "llama", "model.n_head": 4, "model.n_kv_heads": 2}
# name: (ranks, overrides); micro_batch x grad_accum x dp = 2 in every layout
CP_LAYOUTS = {
    # ddp over the cp ranks, two micro-batches (gradients synchronised on the second only)
    "cp2_accum2": (2, {**LONG, "parallel.cp": 2, "train.micro_batch": 1, "train.grad_accum": 2}),
    # dp2 x cp2: fsdp shards over the flattened (dp, cp) mesh; with full checkpointing attention gathers again as
    # each block is recomputed
    "cp2_x_fsdp2_ac": (
        4,
        {**LONG, **FSDP, "parallel.cp": 2, "train.micro_batch": 1, "train.activation_checkpointing": "full"},
    ),
    "cp2_x_tp2": (4, {**LONG, **FSDP, "parallel.cp": 2, "parallel.tp": 2, "train.micro_batch": 2}),
}
LLAMA_CP_LAYOUTS = {
    # rotary positions and grouped-query attention; compiled blocks around the gather
    "llama_cp2_compile": (
        2,
        {**LONG, **LLAMA, **FSDP, "parallel.cp": 2, "train.micro_batch": 2, "train.compile": True},
    ),
}


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory, corpus, gpt_tok):
    single = {"single": (1, {**LONG, "train.micro_batch": 2})}
    return layout_runner(tmp_path_factory.mktemp("cp"), corpus, gpt_tok, {**single, **CP_LAYOUTS})


@pytest.mark.parametrize("layout", list(CP_LAYOUTS))
def test_cp_layout_matches_single_process(cp_runs, layout):
    run = cp_runs(layout)
    nproc, overrides = CP_LAYOUTS[layout]
    start = read_metrics(run)[0]
    assert (start["world_size"], start["cp"], start["tp"]) == (nproc, 2, overrides.get("parallel.tp", 1))
    assert start["dp"] == nproc // (2 * overrides.get("parallel.tp", 1))
    # At 2048 tokens a few weights whose gradient is near zero (one feature of the embeddings) land up to 6e-5 from
    # the single process's: AdamW turns the rounding of another summation order into a step of up to lr. Plain tp2
    # (no cp) at this length lands on the same elements 5.7e-5 away; one wrong update moves a weight ~lr = 3e-3.
    assert_matches(cp_runs("single"), run, weights_atol=1e-4)


def test_llama_cp_matches_single_process(tmp_path, corpus, gpt_tok):
    runs = layout_runner(
        tmp_path, corpus, gpt_tok, {"single": (1, {**LONG, **LLAMA, "train.micro_batch": 2}), **LLAMA_CP_LAYOUTS}
    )
    # inductor's fused kernels round differently from eager (as test_parallel's compiled layouts)
    assert_matches(runs("single"), runs("llama_cp2_compile"), weights_atol=1e-4)


@pytest.mark.parametrize("degree", [2, 4])
def test_split_is_load_balanced_and_covers_the_sequence(degree):
    """Rank r holds chunks r and 2N-1-r: together the ranks hold every position once, and under the causal mask
    every rank's queries see the same number of keys (the same attention work)."""
    t = 64 * degree
    held = [_chunk_positions(r, degree, t // degree) for r in range(degree)]
    assert torch.equal(torch.cat(held).sort().values, torch.arange(t))
    work = {int((q[:, None] >= torch.arange(t)[None, :]).sum()) for q in held}
    assert len(work) == 1, work
    contiguous = [torch.arange(r * t // degree, (r + 1) * t // degree) for r in range(degree)]
    assert len({int((q[:, None] >= torch.arange(t)[None, :]).sum()) for q in contiguous}) == degree


@pytest.mark.parametrize("flash", [True, False], ids=["flash_blocks", "lower_right"])
@pytest.mark.parametrize(("degree", "rank"), [(2, 0), (2, 1), (4, 0), (4, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_block_causal_attention_is_exact(degree, rank, flash, dtype):
    """A rank's two query chunks over the whole sequence's keys (grouped-query heads), forward and backward, equal
    those rows of one causal attention over the whole sequence: to rounding in float64, to bf16's precision (against
    the float64 reference) in bf16."""
    torch.manual_seed(0)
    t, c = 32 * degree, 16
    q, k, v = (torch.randn(2, h, t, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    rows = _chunk_positions(rank, degree, 2 * c)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[..., rows, :]
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    low = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    got_out = block_causal(low[0][..., rows, :], *low[1:], (rank, 2 * degree - 1 - rank), enable_gqa=True, flash=flash)
    got = torch.autograd.grad(got_out, low, grad.to(dtype))
    atol = 1e-12 if dtype == torch.float64 else 0.05
    torch.testing.assert_close(got_out.double(), ref, rtol=0, atol=atol)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize(
    ("overrides", "nproc", "says"),
    [
        ({"parallel.cp": 2, "data.seq_len": 30}, 2, "needs data.seq_len divisible by 2 x cp = 4"),
        ({"parallel.cp": 2, "parallel.engine": "deepspeed"}, 2, "not deepspeed"),
        (
            {"parallel.cp": 3, "data.seq_len": 36},
            2,
            "parallel.cp=3 x parallel.tp=1 = 3 does not divide the world size 2",
        ),
    ],
    ids=["seq_len", "deepspeed", "world"],
)
def test_cp_refusals_are_one_line(tmp_path, corpus, gpt_tok, overrides, nproc, says):
    cfg = write_config(tiny_config(tmp_path / "run", corpus, gpt_tok, **overrides), tmp_path / "c.yaml")
    r = launch(nproc, cfg, timeout=120)
    assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_bert_cp_is_refused(tmp_path, corpus, bert_tok):
    cfg = tiny_config(tmp_path / "run", corpus, bert_tok, arch="bert", **{"parallel.cp": 2})
    r = run_cli("trainer", "train", str(write_config(cfg, tmp_path / "c.yaml")))
    assert r.returncode == 2 and "model.arch=bert attends both ways" in r.stderr and "Traceback" not in r.stderr
