"""Single-process GPT training against an independent reference: a plain PyTorch loop over transformers'
GPT2LMHeadModel, started from the trainer's initial weights (exported to the Hugging Face layout) and fed the same
global sample order.

The reference writes out every piece of the recipe itself (loss normalised by the whole step's target tokens over
grad_accum micro-batches, global-norm clipping, AdamW with decay on weight matrices only, warmup + cosine LR) and
uses nothing from trainer.optim or trainer.train. Per step it must match the trainer's logged loss, lr and grad_norm,
and after the run the trainer's final checkpoint must hold the reference's weights.

grad_norm (before clipping) is compared, not just loss and weights: Adam divides by the gradient's running RMS, so a
uniform error in the gradient's scale (say a wrong normalisation count) barely moves the weights or the loss, but it
scales the norm one for one.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import read_metrics, tiny_config, write_config
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from trainer.checkpoint import load_model
from trainer.config import load_config
from trainer.data import build_stream
from trainer.export import export_hf
from trainer.tokenizer import load_tokenizer
from trainer.train import train

STEPS, WARMUP, GRAD_ACCUM, MICRO_BATCH = 12, 3, 2, 2
LR, MIN_LR, WEIGHT_DECAY, GRAD_CLIP = 3e-3, 3e-4, 0.1, 1.0
BETAS, EPS = (0.9, 0.95), 1e-8  # the config defaults (train.beta1, train.beta2, train.eps)
LOSS_RTOL, NORM_RTOL, LR_RTOL = 1e-4, 1e-4, 1e-9
# Final weights: max measured difference ~7e-6 (fp32 roundoff that Adam's per-element normalisation amplifies where
# a gradient is near zero). The key bias gets its own bound: its gradient is exactly zero in exact arithmetic (a
# per-query constant added to every attention score), so both runs update it from roundoff alone (measured ~1e-5).
WEIGHT_ATOL, KEY_BIAS_ATOL = 2e-5, 1e-4


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def reference_lr(step: int) -> float:
    """Linear warmup to LR, then cosine from LR down to MIN_LR at STEPS; `step` counts from 0."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / (STEPS - WARMUP)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * progress)) * (LR - MIN_LR)


def reference_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """Decay on the 2-D weights of Conv1D / Linear layers; none on biases, LayerNorms and embeddings (wte, wpe; the
    LM head is wte itself)."""
    decay_ids = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, (Conv1D, torch.nn.Linear)) and module.weight.dim() == 2
    }
    decay_ids.discard(id(model.get_input_embeddings().weight))  # a tied lm_head Linear is the embedding table
    params = list(model.parameters())  # a tied Parameter is listed once
    decay = [p for p in params if id(p) in decay_ids]
    no_decay = [p for p in params if id(p) not in decay_ids]
    # GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj per block; Llama: q, k, v, o, gate, up, down, and the untied head
    per_block, untied = (4, 0) if isinstance(model, transformers.GPT2LMHeadModel) else (7, 1)
    assert len(decay) == per_block * model.config.num_hidden_layers + untied
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)


def reference_train(model: torch.nn.Module, batches) -> list[dict]:
    """The plain loop: per step grad_accum micro-batches, each loss sum / the step's target tokens."""
    optimizer = reference_optimizer(model)
    model.train()
    out = []
    for step in range(STEPS):
        micro = [next(batches) for _ in range(GRAD_ACCUM)]
        targets = sum(int((b["labels"] != -100).sum()) for b in micro)
        lr = reference_lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_total = 0.0
        for b in micro:
            logits = model(input_ids=b["input_ids"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100, reduction="sum")
            (loss / targets).backward()
            loss_total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append({"step": step + 1, "loss": loss_total / targets, "lr": lr, "grad_norm": grad_norm})
    return out


def to_hf(model: torch.nn.Module, out_dir: Path):
    export_hf(model, out_dir)
    return transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager")


def run_trainer(tmp_path: Path, corpus: Path, gpt_tok: Path, name: str, **overrides) -> tuple[dict, Path]:
    settings = {
        "train.steps": STEPS,
        "train.warmup_steps": WARMUP,
        "train.grad_accum": GRAD_ACCUM,
        "train.micro_batch": MICRO_BATCH,
        "train.lr": LR,
        "train.min_lr": MIN_LR,
        "train.weight_decay": WEIGHT_DECAY,
        "train.grad_clip": GRAD_CLIP,
        "model.dropout": 0.0,
        "log.every": 1,
        "checkpoint.every": 0,
    }
    cfg = tiny_config(tmp_path / name, corpus, gpt_tok, **{**settings, **overrides})
    train(load_config(write_config(cfg, tmp_path / f"{name}.yaml")))
    return cfg, tmp_path / name


# Llama: GQA (4 query heads over 2 key/value heads), untied head, non-default RoPE base
LLAMA = {"model.arch": "llama", "model.n_head": 4, "model.n_kv_heads": 2, "model.rope_theta": 5e5}


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_training_matches_plain_pytorch_reference_on_transformers(tmp_path, corpus, gpt_tok, family):
    """GPT against GPT2LMHeadModel, Llama against LlamaForCausalLM."""
    arch = LLAMA if family == "llama" else {}
    cfg, run_dir = run_trainer(tmp_path, corpus, gpt_tok, "run", **arch)
    logged = [m for m in read_metrics(run_dir) if "loss" in m and "event" not in m]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))

    # The trainer's own initial weights, whatever its seeding convention: one step at LR 0 leaves AdamW's weights
    # bit-identical (decay is lr * wd, the update lr * m / (sqrt(v) + eps)), and the end-of-run checkpoint holds them.
    _, init_dir = run_trainer(
        tmp_path, corpus, gpt_tok, "init", **{"train.steps": 1, "train.lr": 0.0, "train.min_lr": 0.0, **arch}
    )
    (init_step,) = [m for m in read_metrics(init_dir) if "loss" in m and "event" not in m]
    assert math.isclose(init_step["loss"], logged[0]["loss"], rel_tol=1e-6)  # same weights, same first batch
    ours = load_model(init_dir).eval()
    assert ours.config.vocab_size == load_tokenizer(gpt_tok).vocab_size  # the default: the tokenizer's
    ref = to_hf(ours, tmp_path / "hf_init").eval()
    assert (ref.lm_head.weight is ref.get_input_embeddings().weight) == (family == "gpt")
    m, d, seed = cfg["model"], cfg["data"], cfg["run"]["seed"]
    ids = torch.randint(0, ours.config.vocab_size, (2, d["seq_len"]))
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, ours(ids), rtol=0, atol=1e-5)

    batches = build_stream(
        [str(p) for p in d["train"]],
        fmt=d["format"],
        text_field="text",
        tokenizer_path=d["tokenizer"],
        objective="causal",
        seq_len=d["seq_len"],
        seed=seed,
        dp_rank=0,
        dp_size=1,
        micro_batch=MICRO_BATCH,
        num_workers=0,
    )
    expected = reference_train(ref, iter(batches))

    for got, want in zip(logged, expected):
        step = want["step"]
        assert math.isclose(got["lr"], want["lr"], rel_tol=LR_RTOL), (step, got["lr"], want["lr"])
        assert math.isclose(got["loss"], want["loss"], rel_tol=LOSS_RTOL), (step, got["loss"], want["loss"])
        assert math.isclose(got["grad_norm"], want["grad_norm"], rel_tol=NORM_RTOL), (
            step,
            got["grad_norm"],
            want["grad_norm"],
        )
    # Both kinds of step are compared: the trainer clipped some steps' gradients (norm above the threshold), not all.
    norms = [m["grad_norm"] for m in logged]
    assert any(n > GRAD_CLIP for n in norms) and any(n < GRAD_CLIP for n in norms), norms

    # The final checkpoint, exported the same way, holds the reference's weights.
    trained = load_file(str(export_hf(load_model(run_dir), tmp_path / "hf_final") / "model.safetensors"))
    ref_state = ref.state_dict()
    d_model = m["d_model"]
    for name, tensor in trained.items():
        want = ref_state[name]
        if name.endswith("attn.c_attn.bias"):  # GPT-2's q | k | v
            key = slice(d_model, 2 * d_model)
            torch.testing.assert_close(tensor[key], want[key], rtol=0, atol=KEY_BIAS_ATOL, msg=name + " (key)")
            tensor, want = tensor.clone(), want.clone()
            tensor[key] = want[key] = 0
        torch.testing.assert_close(tensor, want, rtol=0, atol=WEIGHT_ATOL, msg=name)
