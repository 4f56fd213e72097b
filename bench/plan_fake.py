"""`trainer plan --measure` against the formula for models too large for this machine: gpt2-xl, Llama 3.2 1B and an
8B Llama, three layouts each, every rank simulated in one process on fake tensors (trainer/plan/fake.py), bf16.

    python bench/plan_fake.py      # about 2 minutes
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import load_config
from trainer.plan.fake import measure_fake
from trainer.plan.memory import Layout, estimate
from trainer.plan.report import plan_model

LLAMA_8B = [
    "model.n_layer=32",
    "model.n_head=32",
    "model.n_kv_heads=8",
    "model.d_model=4096",
    "model.d_ff=14336",
    "model.vocab_size=128256",
    "model.max_seq_len=8192",
    "model.tie_embeddings=false",
    "model.rope_theta=500000.0",
]
MODELS = {
    "gpt2-xl": (["model.arch=gpt", "model.preset=gpt2-xl", "data.seq_len=1024"], 8),
    "llama3.2-1b": (["model.arch=llama", "model.preset=llama3.2-1b", "data.seq_len=2048"], 16),
    "llama-8b": (["model.arch=llama", *LLAMA_8B, "data.seq_len=4096"], 64),
}
LAYOUTS = {
    "fsdp ZeRO-3, mb 4": ["parallel.engine=fsdp", "parallel.zero_stage=3", "train.micro_batch=4"],
    "fsdp ZeRO-2 x tp 2, mb 2, AC selective": [
        "parallel.engine=fsdp",
        "parallel.zero_stage=2",
        "parallel.tp=2",
        "train.micro_batch=2",
        "train.activation_checkpointing=selective",
    ],
    "fsdp ZeRO-3 x tp 8, mb 1, AC full": [
        "parallel.engine=fsdp",
        "parallel.zero_stage=3",
        "parallel.tp=8",
        "train.micro_batch=1",
        "train.activation_checkpointing=full",
    ],
}


NO_TP = {  # GPT-2 XL's 25 heads split over no tp degree
    "fsdp ZeRO-3, mb 4": LAYOUTS["fsdp ZeRO-3, mb 4"],
    "fsdp ZeRO-2, mb 2, AC selective": [
        "parallel.engine=fsdp",
        "parallel.zero_stage=2",
        "train.micro_batch=2",
        "train.activation_checkpointing=selective",
    ],
    "ddp, mb 8, AC full": ["parallel.engine=ddp", "train.micro_batch=8", "train.activation_checkpointing=full"],
}


def main() -> None:
    print(f"{datetime.date.today()} | fake tensors, fake process group, bf16, rank 0 of the world simulated")
    print(f"{'model':<12} {'world':>5} {'layout':<40} {'measured GiB':>12} {'formula GiB':>11} {'error':>7} {'s':>5}")
    for model, (dims, world) in MODELS.items():
        for name, layout in (NO_TP if model == "gpt2-xl" else LAYOUTS).items():
            cfg = load_config(
                None,
                [
                    "data.train=unused",
                    "data.tokenizer=unused",
                    "train.precision=bf16",
                    "log.wandb.mode=disabled",
                    *dims,
                    *layout,
                ],
            )
            mc, _ = plan_model(cfg)
            t = time.perf_counter()
            got = measure_fake(cfg, mc, world)
            took = time.perf_counter() - t
            want = estimate(mc, Layout.from_config(cfg, world), cfg.data.seq_len).peak
            print(
                f"{model:<12} {world:>5} {name:<40} {got['peak'] / 2**30:>12.2f} {want / 2**30:>11.2f} "
                f"{want / got['peak'] - 1:>+7.1%} {took:>5.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
