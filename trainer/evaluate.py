"""Periodic evaluation (validation loss and perplexity; masked-token accuracy for masked models) and a short sample
from next-token models. All of it goes through the engine on every rank: under FSDP and tensor parallelism the
forward is collective."""

from __future__ import annotations

import math

import torch

from trainer.data.from_config import build_data_stream
from trainer.parallel import ParallelDims, all_reduce_sum, full_value


@torch.no_grad()
def evaluate(engine, batches, steps: int, dims: ParallelDims, device: torch.device) -> dict:
    """Token-weighted loss over `steps` micro-batches of every data-parallel rank (each reads its own share)."""
    engine.train(False)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, target tokens, correct predictions
    for _, batch in zip(range(steps), batches):
        totals += torch.stack([t.to(torch.float64) for t in engine.eval_step(batch)])
    loss_sum, n, correct = all_reduce_sum(totals, dims, "dp_cp").tolist()  # cp ranks: other tokens of the batch
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


def run_evaluation(run, step: int) -> dict:
    """Validation loss over eval_steps global batches from the start of the valid corpus, logged; for next-token
    models a sample too (next-token accuracy is not a figure their users read, masked-token accuracy is)."""
    cfg, dims = run.cfg, run.dims
    stream = build_data_stream(cfg, dims, run.valid_sources, training=False, micro_batch=cfg.train.micro_batch)
    micro_batches = cfg.train.eval_steps * cfg.train.grad_accum  # the same samples whatever the layout
    result = {"step": step, **evaluate(run.engine, iter(stream), micro_batches, dims, run.device)}
    stream.close()
    causal = run.family.objective == "causal"
    if causal:
        result.pop("val_accuracy")
    run.logger.log_eval(result)
    if causal and cfg.train.sample_tokens:
        first_stream = build_data_stream(cfg, dims, run.valid_sources, training=False, micro_batch=1)
        prompt = next(iter(first_stream))["input_ids"][0, :16].tolist()
        first_stream.close()
        n_new = min(cfg.train.sample_tokens, run.model_cfg.max_seq_len - len(prompt))
        ids = generate_sample(
            run.engine,
            prompt,
            n_new,
            device=run.device,
            seed=cfg.run.seed,
            context=run.model_cfg.max_seq_len,
            tp=dims.tp,
        )
        docs, doc = [], []  # decode document by document: the end-of-text token becomes a blank line
        for i in ids:
            if i == run.tok.eos_id:
                docs.append(doc)
                doc = []
            else:
                doc.append(i)
        run.logger.log_text(step, "sample", "\n\n".join(run.tok.tokenizer.decode(d) for d in [*docs, doc]))
    return result
