"""Periodic evaluation: validation loss and perplexity (MLM accuracy for BERT), and a short GPT sample."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.parallel import all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, batches, steps: int, device: torch.device, autocast) -> dict:
    """Token-weighted loss over `steps` micro-batches of every rank (each rank reads its own share)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, target tokens, correct predictions
    for _, batch in zip(range(steps), batches):
        labels = batch["labels"].to(device)
        with autocast():
            logits = model(batch["input_ids"].to(device)).float()
        mask = labels != -100
        totals[0] += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        totals[1] += mask.sum()
        totals[2] += ((logits.argmax(-1) == labels) & mask).sum()
    loss_sum, n, correct = all_reduce_sum(totals).tolist()
    model.train(was_training)
    val_loss = loss_sum / max(n, 1.0)
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "val_accuracy": correct / max(n, 1.0),
        "val_tokens": int(n),
    }


@torch.no_grad()
def generate_sample(
    model: nn.Module, prompt_ids: list[int], n_tokens: int, device: torch.device, seed: int
) -> list[int]:
    """A short continuation, sampled with temperature 0.8 and top-k 40 from a fixed generator."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = model.generate(ids, max_new_tokens=n_tokens, temperature=0.8, top_k=40, generator=gen)
    model.train(was_training)
    return out[0].tolist()
