"""Periodic evaluation (validation loss and perplexity, MLM accuracy for BERT) and a short GPT sample.

All of it goes through the engine's forward on every rank: under FSDP and tensor parallelism the forward is collective.
"""

from __future__ import annotations

import math

import torch

from trainer.models.layers import token_loss_sum
from trainer.parallel import ParallelDims, all_reduce_sum, full_value, loss_context


@torch.no_grad()
def evaluate(engine, batches, steps: int, dims: ParallelDims, device: torch.device) -> dict:
    """Token-weighted loss over `steps` micro-batches of every data-parallel rank (each reads its own share)."""
    engine.train(False)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, target tokens, correct predictions
    for _, batch in zip(range(steps), batches):
        labels = batch["labels"].to(device)
        with loss_context(dims.tp):
            logits = engine.forward(batch["input_ids"].to(device))
            totals[0] += full_value(token_loss_sum(logits, labels))
        mask = labels != -100
        totals[1] += mask.sum()
        totals[2] += ((full_value(logits).argmax(-1) == labels) & mask).sum()  # gathers vocab shards: eval only
    loss_sum, n, correct = all_reduce_sum(totals, dims, "dp").tolist()
    engine.train(True)
    val_loss = loss_sum / max(n, 1.0)
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "val_accuracy": correct / max(n, 1.0),
        "val_tokens": int(n),
    }


@torch.no_grad()
def generate_sample(
    engine, prompt_ids: list[int], n_tokens: int, *, device: torch.device, seed: int, context: int, tp: int
) -> list[int]:
    """A short continuation sampled with temperature 0.8 and top-k 40 from a fixed generator; every rank computes the
    same tokens. Under sequence parallelism the input length must be a multiple of tp: the window is padded on the
    right, which a causal model's earlier positions never see."""
    engine.train(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    window = context - context % tp
    for _ in range(n_tokens):
        x = ids[:, -window:]
        t = x.shape[1]
        pad = (-t) % tp
        if pad:
            x = torch.cat([x, x.new_zeros(1, pad)], dim=1)
        logits = full_value(engine.forward(x))[:, t - 1, :].float() / 0.8
        kth = torch.topk(logits, min(40, logits.shape[-1]), dim=-1).values[:, -1:]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, num_samples=1, generator=gen)], dim=1)
    engine.train(True)
    return ids[0].tolist()
