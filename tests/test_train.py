"""The training loop against independent references: reshaped batches, 2-rank DDP, and stop/resume all reproduce the
reference run's losses and weights."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    read_metrics,
    run_cli,
    start_trainer,
    step_losses,
    tiny_config,
    torchrun,
    wait_for_step,
    write_config,
)
from torch.overrides import TorchFunctionMode

from trainer.checkpoint import latest_checkpoint, load_model
from trainer.config import load_config
from trainer.engines.base import LossScaler, optimizer_step
from trainer.models import build_model
from trainer.models.layers import token_loss_sum
from trainer.train import train


def train_in_process(cfg: dict, tmp_path: Path, name: str = "cfg.yaml") -> dict:
    return train(load_config(write_config(cfg, tmp_path / name)))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(latest_checkpoint(Path(run_dir) / "checkpoints")).state_dict()


def assert_same_run(a: Path, b: Path, rtol: float = 1e-6, weights_atol: float = 1e-6) -> None:
    la, lb = step_losses(a), step_losses(b)
    assert la.keys() == lb.keys()
    for step in la:
        assert math.isclose(la[step], lb[step], rel_tol=rtol), (step, la[step], lb[step])
    wa, wb = final_weights(a), final_weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=weights_atol, msg=lambda m, n=name: f"{n}: {m}")


def test_gpt_trains_and_writes_artifacts(tmp_path, corpus, gpt_tok, monkeypatch):
    monkeypatch.delenv("TRAINER_PEAK_TFLOPS")  # the peak measured at start-up, as a run on a CPU does
    cfg = tiny_config(
        tmp_path / "run",
        corpus,
        gpt_tok,
        **{"train.steps": 30, "train.eval_every": 15, "checkpoint.every": 10, "train.warmup_steps": 5},
    )
    train_in_process(cfg, tmp_path)
    lines = read_metrics(tmp_path / "run")
    start = lines[0]
    assert start["event"] == "start" and start["global_batch_tokens"] == 4 * 32 and start["resumed_from_step"] is None
    steps = [m for m in lines if "loss" in m and "event" not in m]
    assert [m["step"] for m in steps] == list(range(1, 31))
    assert steps[-1]["tokens"] == 30 * 4 * 32
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.6  # it learns: ln(512) = 6.2 at the start
    # MFU as logged is the step's tokens/s x (6N + 12 L d T, N = every parameter but the position table) / the peak,
    # worked out here from the model's dims alone
    n_without_positions = start["n_params"] - 64 * 64  # max_seq_len x d_model
    assert start["flops_per_token"] == 6 * n_without_positions + 12 * 2 * 64 * 32
    for m in steps:
        assert m["tokens_per_s"] == pytest.approx(4 * 32 / m["step_time_s"], rel=1e-9)
        # against the peak in force at that step (a step that beat the measured peak raised it): never above 1
        assert m["mfu"] == pytest.approx(min(1.0, m["tokens_per_s"] * start["flops_per_token"] / m["peak_flops"]))
        assert 0 < m["mfu"] <= 1 and m["peak_flops"] >= start["peak_flops"]
    evals = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in evals] == [15, 30] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert any("sample" in m for m in lines)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_20", "step_30"]  # keep=2
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_30"


def test_tokenizer_given_as_its_directory_trains_and_checkpoints(tmp_path, corpus, gpt_tok):
    """data.tokenizer may name the directory `trainer tokenizer --out` wrote: the checkpoint still carries the file."""
    cfg = tiny_config(tmp_path / "run", corpus, Path(gpt_tok).parent, **{"train.steps": 2})
    train_in_process(cfg, tmp_path)
    saved = tmp_path / "run" / "checkpoints" / "step_2" / "tokenizer.json"
    assert saved.read_bytes() == Path(gpt_tok).read_bytes()


def test_bert_micro_batch_reshape_gives_same_update(tmp_path, corpus, bert_tok):
    """8 x 1 and 2 x 4 see the same samples and masks; only the global token normalisation makes them equal."""
    base = {"train.steps": 3, "checkpoint.every": 3}
    a = tiny_config(tmp_path / "a", corpus, bert_tok, "bert", **base, **{"train.micro_batch": 8})
    b = tiny_config(tmp_path / "b", corpus, bert_tok, "bert", **base, **{"train.micro_batch": 2, "train.grad_accum": 4})
    train_in_process(a, tmp_path, "a.yaml")
    train_in_process(b, tmp_path, "b.yaml")
    # a weight whose gradient is near zero can land ~1e-5 away (AdamW turns another summation order's rounding into
    # a step of up to lr); a wrong normalisation moves every weight by far more
    assert_same_run(tmp_path / "a", tmp_path / "b", rtol=1e-5, weights_atol=1e-4)


def test_activation_checkpointing_does_not_change_numerics(tmp_path, corpus, gpt_tok):
    base = {"train.steps": 3, "checkpoint.every": 3}
    train_in_process(tiny_config(tmp_path / "a", corpus, gpt_tok, **base), tmp_path, "a.yaml")
    train_in_process(
        tiny_config(tmp_path / "b", corpus, gpt_tok, **base, **{"train.activation_checkpointing": "full"}),
        tmp_path,
        "b.yaml",
    )
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_two_rank_ddp_equals_one_process(tmp_path, corpus, bert_tok):
    """BERT: the masked-token count differs per rank, so this also checks the global-batch loss normalisation."""
    base = {"train.steps": 3, "checkpoint.every": 3, "train.eval_every": 3}
    one = write_config(
        tiny_config(tmp_path / "one", corpus, bert_tok, "bert", **base, **{"train.micro_batch": 4}),
        tmp_path / "one.yaml",
    )
    two = write_config(
        tiny_config(tmp_path / "two", corpus, bert_tok, "bert", **base, **{"train.micro_batch": 2}),
        tmp_path / "two.yaml",
    )
    r = run_cli("trainer", "train", str(one), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("launch", "local", "--nproc-per-node", "2", "--", str(two))  # the launcher runs torchrun
    assert r.returncode == 0, r.stderr[-3000:]
    start = read_metrics(tmp_path / "two")[0]
    assert start["world_size"] == 2 and start["dp"] == 2
    # AdamW turns rounding in a near-zero gradient into a full lr-sized step: a lone BERT weight can differ by ~2e-5
    # (seen in CI); a real error moves weights by ~lr = 3e-3 per step.
    assert_same_run(tmp_path / "one", tmp_path / "two", rtol=1e-5, weights_atol=1e-4)
    val = [[m["val_loss"] for m in read_metrics(tmp_path / d) if "val_loss" in m] for d in ("one", "two")]
    assert math.isclose(val[0][0], val[1][0], rel_tol=1e-5)


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, corpus, gpt_tok):
    """Stop with SIGTERM mid-run (checkpoint written at that step), resume with the same command: every logged loss
    and the final weights equal the uninterrupted run's, and the W&B run continues under the same id."""
    overrides = {
        "train.steps": 40,
        "checkpoint.every": 0,
        "model.dropout": 0.1,
        "log.wandb.mode": "offline",
        "train.eval_every": 0,
    }
    ref_cfg = write_config(tiny_config(tmp_path / "ref", corpus, gpt_tok, **overrides), tmp_path / "ref.yaml")
    r = run_cli("trainer", "train", str(ref_cfg))
    assert r.returncode == 0, r.stderr[-2000:]

    cfg = write_config(tiny_config(tmp_path / "run", corpus, gpt_tok, **overrides), tmp_path / "run.yaml")
    proc = start_trainer(cfg)
    wait_for_step(tmp_path / "run", 5, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = latest_checkpoint(tmp_path / "run" / "checkpoints")
    stopped_step = int(stopped.name.split("_")[1])
    assert 5 <= stopped_step < 40, "the signal should stop the run early"
    first_id = json.loads((stopped / "state.json").read_text())["train_state"]["wandb_run_id"]

    r = run_cli("trainer", "train", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    starts = [m for m in read_metrics(tmp_path / "run") if m.get("event") == "start"]
    assert [s["resumed_from_step"] for s in starts] == [None, stopped_step]
    assert_same_run(tmp_path / "ref", tmp_path / "run")
    final = latest_checkpoint(tmp_path / "run" / "checkpoints")
    state = json.loads((final / "state.json").read_text())["train_state"]
    assert state["wandb_run_id"] == first_id and first_id
    wandb_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.name.endswith(first_id) for p in wandb_runs)
    assert state["data"]["next_sample"] == 40 * 4


def test_bf16_and_fp16_follow_the_fp32_curve(tmp_path, corpus, gpt_tok):
    """24 steps at each precision (autocast, fp32 master weights): every step's loss stays near the fp32 run's and
    its gradient norm within 10% (AdamW would hide a gradient left scaled by fp16's loss scale; the norm does not),
    while the curve moves."""
    curves = {}
    for precision in ("fp32", "bf16", "fp16"):
        overrides = {"train.steps": 24, "train.precision": precision, "model.d_model": 32, "data.seq_len": 16}
        train_in_process(tiny_config(tmp_path / precision, corpus, gpt_tok, **overrides), tmp_path, f"{precision}.yaml")
        curves[precision] = {
            m["step"]: m for m in read_metrics(tmp_path / precision) if "loss" in m and "event" not in m
        }
    ref = curves["fp32"]
    assert sorted(ref) == list(range(1, 25)) and ref[24]["loss"] < ref[1]["loss"] - 0.5
    for precision in ("bf16", "fp16"):
        got = curves[precision]
        for step in ref:
            assert abs(got[step]["loss"] - ref[step]["loss"]) < 0.1, (precision, step, got[step], ref[step])
            assert abs(got[step]["grad_norm"] / ref[step]["grad_norm"] - 1) < 0.1, (precision, step)
        assert got[24]["skipped_steps"] == 0


def tiny_step_setup(*, fused: bool, init_scale: float, lr: float):
    """A one-layer GPT with AdamW, an fp16 loss scaler (enabled unless the scale is 1) and a batch of ids."""
    torch.manual_seed(0)
    model = build_model("gpt", n_layer=1, n_head=2, d_model=32, vocab_size=64, max_seq_len=16)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, fused=fused)
    scaler = LossScaler(enabled=init_scale != 1.0, init_scale=init_scale)
    return model, params, optimizer, scaler, torch.randint(0, 64, (2, 16))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_fp16_overflow_backs_off_and_leaves_the_weights_untouched(fused):
    """A loss scale too large for fp16: the gradients overflow, the step is skipped (weights and AdamW state as they
    were) and the scale halves, until a step fits and applies. Fused AdamW skips inside its kernel (found_inf, no
    host read); the unfused fallback on the host."""
    model, params, optimizer, scaler, ids = tiny_step_setup(fused=fused, init_scale=2.0**40, lr=1e-2)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(ids)
        scaler.scale_loss(token_loss_sum(logits, ids) / ids.numel()).backward()
        return optimizer_step(params, optimizer, scaler, grad_clip=1.0, lr=1e-2)

    def untouched_state() -> bool:  # fused AdamW creates its state (zeros, step 0) even on a skipped step
        states = list(optimizer.state.values())
        return all(float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in states)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    norm, applied = step()
    assert not math.isfinite(norm) and not applied and scaler.scale == 2.0**39
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and untouched_state()
    skipped = 1
    while not applied:
        norm, applied = step()
        skipped += not applied
    assert math.isfinite(norm) and scaler.scale == 2.0 ** (40 - skipped) and skipped > 2
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not untouched_state()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("scale", [1.0, 2.0**12], ids=["unscaled", "scaled"])
def test_the_update_sees_the_unscaled_clipped_gradient(fused, scale):
    """AdamW's first moment after one step is (1 - beta1) x the gradient it was given: it must be the gradient
    unscaled and clipped by the global norm, as torch's clip_grad_norm_ clips it (Adam's update alone would hide a
    wrong factor). Fused AdamW gets both factors through its grad_scale, the fallback as a multiply first."""
    model, params, optimizer, scaler, ids = tiny_step_setup(fused=fused, init_scale=scale, lr=1e-3)
    reference = copy.deepcopy(model)
    token_loss_sum(reference(ids), ids).backward()
    norm_ref = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert norm_ref > 1.0  # the clip is active

    scaler.scale_loss(token_loss_sum(model(ids), ids)).backward()
    norm, applied = optimizer_step(params, optimizer, scaler, grad_clip=0.5, lr=1e-3)
    assert bool(applied) and torch.allclose(norm, norm_ref, rtol=1e-5)
    for p, r in zip(params, reference.parameters()):
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], 0.1 * r.grad, rtol=1e-4, atol=1e-9)  # beta1 0.9


class NoHostReads(TorchFunctionMode):
    """Fails on any read of a tensor's value by the host (each one a device synchronisation on a GPU)."""

    READS = frozenset(
        {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"the host read a tensor's value: {func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("finite", [True, False], ids=["applied", "skipped"])
def test_the_optimizer_step_never_reads_a_device_value(finite):
    """The end of the step (norm, fp16 unscale, clip, skip verdict, fused AdamW, loss-scale update) runs without the
    host reading any tensor: on a GPU nothing there waits for the device. The loop reads norm and verdict when it
    logs."""
    model, params, optimizer, scaler, ids = tiny_step_setup(fused=True, init_scale=2.0**8, lr=1e-3)
    scaler.scale_loss(token_loss_sum(model(ids), ids)).backward()
    before = [p.detach().clone() for p in params]
    with NoHostReads():
        norm, applied = optimizer_step(
            params, optimizer, scaler, grad_clip=1.0, lr=1e-3, loss_finite=torch.tensor(finite)
        )
    assert bool(applied) == finite and math.isfinite(norm)
    assert scaler.scale == (2.0**8 if finite else 2.0**7)
    assert any(not torch.equal(a, b) for a, b in zip(before, params)) == finite


def test_fp16_loss_scale_survives_a_resume(tmp_path, corpus, gpt_tok):
    """Tiny batches overflow fp16 at the initial scale (2^16), so the first step is skipped and the scale halves; a
    run resumed from step 12 must continue with the saved scale and match the uninterrupted run."""
    overrides = {
        "train.steps": 24,
        "train.precision": "fp16",
        "train.micro_batch": 1,
        "data.seq_len": 4,
        "checkpoint.every": 12,
    }
    train_in_process(tiny_config(tmp_path / "full", corpus, gpt_tok, **overrides), tmp_path, "full.yaml")
    full = [m for m in read_metrics(tmp_path / "full") if "loss" in m and "event" not in m]
    assert full[11]["skipped_steps"] > 0  # the scale backed off before the checkpoint
    resume = {**overrides, "checkpoint.resume": str(tmp_path / "full" / "checkpoints" / "step_12")}
    train_in_process(tiny_config(tmp_path / "resumed", corpus, gpt_tok, **resume), tmp_path, "resumed.yaml")
    resumed = {m["step"]: m for m in read_metrics(tmp_path / "resumed") if "loss" in m and "event" not in m}
    assert sorted(resumed) == list(range(13, 25))
    for m in full[12:]:
        assert resumed[m["step"]]["loss"] == m["loss"] and resumed[m["step"]]["skipped_steps"] == m["skipped_steps"]
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, corpus, gpt_tok, engine):
    """An absurd LR blows the weights up after one update; later steps are non-finite, skipped, and the run stops.
    Under deepspeed the skip is DeepSpeed's own (its overflow check), counted the same way."""
    cfg = write_config(
        tiny_config(
            tmp_path / "run",
            corpus,
            gpt_tok,
            **{
                "train.steps": 20,
                "train.lr": 1e30,
                "train.min_lr": 0.0,
                "train.warmup_steps": 0,
                "train.max_bad_steps": 3,
                "train.grad_clip": 0.0,
                "parallel.engine": engine,
            },
        ),
        tmp_path / "c.yaml",
    )
    r = run_cli("trainer", "train", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "non-finite" in r.stderr.strip().splitlines()[-1]
    lines = [m for m in read_metrics(tmp_path / "run") if "loss" in m and "event" not in m]
    assert lines[-1]["skipped_steps"] == 3 and len(lines) <= 5


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_export_from_checkpoint_loads_in_transformers(tmp_path, corpus, gpt_tok, bert_tok, arch, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = gpt_tok if arch == "gpt" else bert_tok
    cfg = write_config(tiny_config(tmp_path / "run", corpus, tok, arch, **{"train.steps": 2}), tmp_path / "c.yaml")
    assert run_cli("trainer", "train", str(cfg)).returncode == 0
    r = run_cli("trainer", "export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    cls = transformers.GPT2LMHeadModel if arch == "gpt" else transformers.BertForMaskedLM
    hf = cls.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(tmp_path / "run")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)


def test_prepared_shards_train_like_streaming(tmp_path, corpus, gpt_tok):
    """`trainer prepare` then data.format=tokens: the same losses as streaming the text. In corpus order (no shuffle,
    one stream): with shuffling on, prepared shards permute whole epochs while raw streams shuffle units and blocks,
    two different orders by design."""
    base = {"train.steps": 3, "checkpoint.every": 3, "train.eval_every": 3, "data.shuffle": False, "data.streams": 1}
    text_cfg = write_config(tiny_config(tmp_path / "text", corpus, gpt_tok, **base), tmp_path / "text.yaml")
    r = run_cli("trainer", "prepare", str(text_cfg), "--out", str(tmp_path / "shards"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "shards" / "train" / "meta.json").is_file()
    train_in_process(tiny_config(tmp_path / "text", corpus, gpt_tok, **base), tmp_path, "text.yaml")
    shards = {
        "data.train": [str(tmp_path / "shards" / "train")],
        "data.valid": [str(tmp_path / "shards" / "valid")],
        "data.format": "tokens",
    }
    train_in_process(tiny_config(tmp_path / "tokens", corpus, gpt_tok, **base, **shards), tmp_path, "tokens.yaml")
    assert_same_run(tmp_path / "text", tmp_path / "tokens")
    val = [[m["val_loss"] for m in read_metrics(tmp_path / d) if "val_loss" in m] for d in ("text", "tokens")]
    assert val[0] == val[1]


def test_compile_matches_eager(tmp_path, corpus, gpt_tok):
    base = {"train.steps": 3, "checkpoint.every": 3, "model.n_layer": 1}
    train_in_process(tiny_config(tmp_path / "eager", corpus, gpt_tok, **base), tmp_path, "a.yaml")
    train_in_process(
        tiny_config(tmp_path / "compiled", corpus, gpt_tok, **base, **{"train.compile": True}), tmp_path, "b.yaml"
    )
    assert_same_run(tmp_path / "eager", tmp_path / "compiled", rtol=1e-4, weights_atol=1e-4)


def test_resume_on_two_ranks_continues_a_one_process_run(tmp_path, corpus, bert_tok):
    """Checkpoint on 1 process, resume under torchrun on 2 ranks at the same global batch: the losses and weights
    equal the uninterrupted 1-process run, so no sample was repeated or skipped across the change of world size."""
    base = {"train.steps": 4, "checkpoint.every": 2}
    ref = write_config(tiny_config(tmp_path / "ref", corpus, bert_tok, "bert", **base), tmp_path / "ref.yaml")
    assert run_cli("trainer", "train", str(ref), env={"OMP_NUM_THREADS": "1"}).returncode == 0

    cfg = write_config(tiny_config(tmp_path / "run", corpus, bert_tok, "bert", **base), tmp_path / "run.yaml")
    r = run_cli("trainer", "train", str(cfg), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_4")  # drop the end of the run: resume from step 2
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_2")
    r = torchrun(2, cfg, "train.micro_batch=2")
    assert r.returncode == 0, r.stderr[-3000:]
    starts = [m for m in read_metrics(tmp_path / "run") if m.get("event") == "start"]
    assert [(s["resumed_from_step"], s["world_size"]) for s in starts] == [(None, 1), (2, 2)]
    assert_same_run(tmp_path / "ref", tmp_path / "run", rtol=1e-5, weights_atol=1e-5)


def test_half_written_checkpoint_is_ignored_and_removed(tmp_path, corpus, gpt_tok):
    """What a crash mid-save leaves (a .tmp_step_N directory, a step directory without its state file) neither
    breaks nor misleads a resume: it continues from the latest complete checkpoint."""
    cfg = tiny_config(tmp_path / "run", corpus, gpt_tok, **{"train.steps": 2, "checkpoint.every": 2})
    train_in_process(cfg, tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / ".tmp_step_3").mkdir()
    (ckpts / ".tmp_step_3" / "model.pt").write_bytes(b"half a file")
    (ckpts / "step_3").mkdir()  # a directory without state.json is not a checkpoint
    assert latest_checkpoint(ckpts).name == "step_2"
    cfg["train"]["steps"] = 4
    train_in_process(cfg, tmp_path)
    starts = [m for m in read_metrics(tmp_path / "run") if m.get("event") == "start"]
    assert starts[-1]["resumed_from_step"] == 2
    assert not (ckpts / ".tmp_step_3").exists()
    assert (ckpts / "latest").read_text() == "step_4"


def test_sigusr1_checkpoints_and_stops(tmp_path, corpus, gpt_tok):
    """SIGUSR1 (what Slurm sends ahead of a time limit, with --signal) stops like SIGTERM: checkpoint, exit 0."""
    cfg = write_config(
        tiny_config(tmp_path / "run", corpus, gpt_tok, **{"train.steps": 100000, "checkpoint.every": 0}),
        tmp_path / "c.yaml",
    )
    proc = start_trainer(cfg)
    wait_for_step(tmp_path / "run", 3, proc)
    os.killpg(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stop signal received" in out + err
    step = max(step_losses(tmp_path / "run"))
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == f"step_{step}"


def test_mixture_logs_samples_per_source_and_resumes_with_new_weights(tmp_path, corpus, gpt_tok):
    """Two weighted sources: `samples_<name>` in every step line (cumulative, summing to the samples trained); a
    resume with other weights continues both counts; data.valid_fraction evaluates on held-out documents."""
    text = corpus.read_text()
    cut = text.index("\n\n", len(text) // 3)
    (tmp_path / "a.txt").write_text(text[:cut])
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in text[cut:].split("\n\n") if p.strip())
    )
    train = {"a": {"path": [str(tmp_path / "a.txt")], "weight": 1}, "b": {"path": [str(tmp_path / "b.jsonl")]}}
    base = {"data.train": train, "data.valid": [], "data.format": "auto", "data.streams": 4, "train.steps": 4}
    cfg = tiny_config(tmp_path / "run", corpus, gpt_tok, **base, **{"checkpoint.every": 2})
    train_in_process(cfg, tmp_path)
    steps = [m for m in read_metrics(tmp_path / "run") if "loss" in m and "event" not in m]
    assert [m["samples_a"] + m["samples_b"] for m in steps] == [4, 8, 12, 16]
    assert steps[-1]["samples_a"] == steps[-1]["samples_b"] == 8
    train["a"]["weight"] = 3
    train_in_process({**cfg, "train": {**cfg["train"], "steps": 8}}, tmp_path)
    steps = [m for m in read_metrics(tmp_path / "run") if "loss" in m and "event" not in m]
    assert steps[-1]["step"] == 8 and steps[-1]["samples_a"] == 8 + 12 and steps[-1]["samples_b"] == 8 + 4
    held = {**base, "data.train": [str(tmp_path / "a.txt")], "data.valid_fraction": 0.2, "train.eval_every": 2}
    train_in_process(tiny_config(tmp_path / "held", corpus, gpt_tok, **held), tmp_path, "held.yaml")
    evals = [m for m in read_metrics(tmp_path / "held") if "val_loss" in m]
    assert len(evals) == 2 and all(math.isfinite(m["val_loss"]) for m in evals)


def test_data_workers_start_before_the_model_and_stop_when_the_start_fails(tmp_path, corpus, gpt_tok, monkeypatch):
    """The tokenizing workers are running while the model is built (they read the first blocks meanwhile, and fork
    before the model's memory exists); when building fails after they started, they are stopped with the error."""
    import multiprocessing

    import trainer.build as train_module

    def new_children() -> set[int]:  # other tests in this process may have left children of their own
        return {c.pid for c in multiprocessing.active_children()} - before

    before = {c.pid for c in multiprocessing.active_children()}
    seen = []
    build = train_module.build_model

    def watching_build(*args, **kwargs):
        seen.append(len(new_children()))
        return build(*args, **kwargs)

    monkeypatch.setattr(train_module, "build_model", watching_build)
    train_in_process(tiny_config(tmp_path / "run", corpus, gpt_tok, **{"train.steps": 1}), tmp_path)
    assert seen == [1]

    def failing_build(*args, **kwargs):
        raise RuntimeError("model build failed")

    monkeypatch.setattr(train_module, "build_model", failing_build)
    with pytest.raises(RuntimeError, match="model build failed") as failure:
        train_in_process(tiny_config(tmp_path / "run2", corpus, gpt_tok), tmp_path, "c2.yaml")
    # `failure` keeps the traceback, and with it the half-built run's frames, alive: only an explicit close stops them
    deadline = time.monotonic() + 10
    while new_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not new_children() and failure.tb is not None
