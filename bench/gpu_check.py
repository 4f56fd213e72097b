"""GPU acceptance run: one command, one table, every row with its figure, its target and PASS/FAIL/SKIP.

    make gpu-check                                  # or: python bench/gpu_check.py
    python bench/gpu_check.py --quick               # smaller shapes: checks that every row runs
    python bench/gpu_check.py --rows env,parity,cp-attention

Rows (`--rows` takes their names, comma-separated):
- env: torch, CUDA and NCCL versions, bf16 support, the GPU and the peak FLOP/s MFU is measured against (the
  spec-sheet table of trainer/metrics.py, beside `trainer plan`'s accelerator table of trainer/plan/hardware.py).
- gpt2-small, llama3.2-1b: the trainer's step (its model, compile, engine, bf16 autocast and fused AdamW, as
  `trainer train` builds them with train.compile=true, on random token ids in page-locked host memory as the loop
  hands them over; no data loading or logging) against transformers' GPT2LMHeadModel / LlamaForCausalLM of the same
  dims and parameter count (the family's Hugging Face config) with torch.compile over model and loss, bf16 autocast
  and fused AdamW, ids on the GPU; tokens/s (median of timed windows after warm-up steps, CUDA synchronised)
  and MFU against the spec-sheet peak (target: >= 1.0x; MFU > 40% for the 1B model). Then the run's peak of
  `torch.cuda.max_memory_allocated` (reset before the model is built) against `trainer plan`'s predicted peak for
  the same config (target: within 10%).
- parity: one process without a process group, then FSDP2 (ZeRO-3) and DDP in a process group of one (NCCL beside
  gloo, as `trainer train` joins it), the same batches: per-step loss and grad norm within 1e-4 (relative) in fp32,
  and FSDP2 bf16 (its mixed-precision policy) against one process in bf16 within 0.05 of the loss.
- parity-2gpu: the same under torchrun on 2 GPUs (dp 2), against one process; cannot run with fewer GPUs.
- cp-attention: context parallelism's attention of a rank's two query chunks over the whole sequence (its CUDA path:
  lower-right causal kernels, no mask built) against one causal attention (fp32 math kernel), forward and backward, in
  bf16: each error (relative to the largest value) within 2^-7 of one bf16 causal attention's; and the kernels that
  ran (flash or memory-efficient).
- async-checkpoint: bench/async_checkpoint.py's worker on one GPU (FSDP ZeRO-3, pinned host staging): the step
  blocked per checkpoint.async save against a synchronous save (target <= 25%).
- profile: `trainer train` with profile.steps=[2,3] and profile.memory_snapshot=true (a trace with CUDA kernels, a
  memory snapshot), and a model too big for the GPU (one line, and its out-of-memory snapshot).

Written to finish within 8 minutes on one H100 or H200 (the `s` column: each row's seconds); not yet run on a GPU.
A row that fails does not stop the others: its error's first line is its figure. A row that cannot run says why
(SKIP). The command exits 1 when any row fails, 2 (with one line) on a machine without a GPU or for unknown rows.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PASS, FAIL, SKIP, INFO = "PASS", "FAIL", "SKIP", "info"


# --------------------------------------------------------------------------------------------------- the table


@dataclass
class Row:
    check: str
    figure: str
    target: str
    result: str  # PASS | FAIL | SKIP | info
    seconds: float | None = None  # the task's time, on its first row


def judged(check: str, figure: str, target: str, ok: bool) -> Row:
    return Row(check, figure, target, PASS if ok else FAIL)


def skipped(check: str, why: str) -> Row:
    return Row(check, f"cannot run: {why}", "-", SKIP)


def error_line(stderr: str) -> str:
    """The line of a child's stderr that says what went wrong: the last naming an error, else its last line."""
    lines = [x.strip() for x in stderr.strip().splitlines() if x.strip()]
    named = [x for x in lines if "Error" in x or x.startswith("error:")]
    return (named or lines or ["no output"])[-1][:300]


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def format_table(rows: list[Row]) -> str:
    """The rows as one Markdown table (what docs/benchmarks.md shows)."""
    lines = ["| check | figure | target | result | s |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = [r.check, r.figure, r.target, r.result, "" if r.seconds is None else f"{r.seconds:.0f}"]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def exit_status(rows: list[Row]) -> int:
    """1 when any row failed, else 0 (rows that could not run do not fail the check)."""
    return 1 if any(r.result == FAIL for r in rows) else 0


def flops(rate: float) -> str:
    """FLOP/s in the unit that fits (a CPU's peak is GFLOP/s)."""
    return f"{rate / 1e12:,.0f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:,.1f} GFLOP/s"


def within(measured: float, target: float, tolerance: float) -> bool:
    return target > 0 and abs(measured / target - 1) <= tolerance


# --------------------------------------------------------------------------------------------------- shared bits


def sync(device: torch.device) -> None:
    """Waits for the device's queued work, so a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rates(step: Callable[[], object], tokens: int, device: torch.device, warmup: int, windows: int, steps: int):
    """Tokens/s of `windows` windows of `steps` steps after `warmup` unmeasured ones (compilation, first-step
    allocations), each window between two device synchronisations."""
    for _ in range(warmup):
        step()
    sync(device)
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps * tokens / (time.perf_counter() - t0))
    return rates


def free(device: torch.device) -> None:
    """Drops what a task left: compiled graphs (the next model has other shapes), cached device memory."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def token_stub(vocab: int) -> SimpleNamespace:
    """What `resolve_model` reads of a tokenizer (no tokenizer file is needed: batches are random ids)."""
    return SimpleNamespace(vocab_size=vocab, eos_id=0, cls_id=1, sep_id=2, mask_id=3, path=None)


def config(model: dict, seq: int, batch: int, *overrides: str):
    """A trainer config (as `trainer train` would load it) for a model given as model.* keys."""
    from trainer.config import load_config

    return load_config(
        None,
        [
            "data.train=unused",
            "data.tokenizer=unused",
            f"data.seq_len={seq}",
            f"train.micro_batch={batch}",
            "log.wandb.mode=disabled",
            *(f"model.{k}={v}" for k, v in model.items()),
            *overrides,
        ],
    )


def random_batches(vocab: int, seq: int, batch: int, n: int, device: torch.device | str = "cpu", seed: int = 0):
    """`n` micro-batches of random token ids (input_ids, labels shifted by one)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (batch, seq + 1), generator=gen)
        out.append({"input_ids": ids[:, :-1].contiguous().to(device), "labels": ids[:, 1:].contiguous().to(device)})
    return out


# -------------------------------------------------------------------------------------------------- environment


def environment(device: torch.device) -> dict:
    import torch.distributed as dist

    from trainer.metrics import peak_flops
    from trainer.plan.hardware import GPUS

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "nccl": None, "bf16": False, "gpus": 0}
    if device.type == "cuda":
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else None
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["gpus"] = torch.cuda.device_count()
        info["name"] = torch.cuda.get_device_name(device)
        info["memory"] = torch.cuda.get_device_properties(device).total_memory
    else:
        info["name"] = "cpu"
    info["peak"], info["peak_source"] = peak_flops(device, torch.bfloat16)
    plan = [g for key, g in GPUS.items() if key.split("-")[0] in info["name"].lower()]
    info["plan_gpu"] = plan[0].describe() if plan else None
    return info


def env_rows(info: dict) -> list[Row]:
    gib = f", {info['memory'] / 2**30:.1f} GiB" if info.get("memory") else ""
    spec = info["peak_source"].startswith("spec sheet")
    return [
        judged(
            "torch, CUDA, NCCL",
            f"torch {info['torch']}, CUDA {info['cuda']}, NCCL {info['nccl']}",
            "a CUDA build with NCCL",
            bool(info["cuda"] and info["nccl"]),
        ),
        judged("bf16", "supported" if info["bf16"] else "not supported", "supported", info["bf16"]),
        judged(
            "GPU and MFU peak",
            f"{info['gpus']} x {info['name']}{gib}; MFU against {flops(info['peak'])} ({info['peak_source']})",
            "a spec-sheet bf16 peak",
            spec,
        ),
        Row("trainer plan's accelerator", info["plan_gpu"] or "not in the table: use --gpu-memory", "-", INFO),
    ]


# --------------------------------------------------------------------------------------------------- throughput

# name: (model.* keys, seq, micro_batch, warm-up steps, windows x steps, MFU target or None); quick: smaller shapes
MODELS = {
    "gpt2-small": ({"arch": "gpt", "preset": "gpt2-small", "vocab_size": 50257}, 1024, 8, 5, (3, 10), None),
    "llama3.2-1b": ({"arch": "llama", "preset": "llama3.2-1b", "vocab_size": 128256}, 2048, 4, 4, (3, 6), 0.40),
}
QUICK = {"seq": 256, "batch": 2, "n_layer": 2, "warmup": 2, "windows": (2, 3)}


def shape_of(name: str, quick: bool) -> tuple[dict, int, int, int, tuple[int, int], float | None]:
    model, seq, batch, warmup, windows, mfu = MODELS[name]
    if quick:
        model = {**model, "n_layer": QUICK["n_layer"]}
        seq, batch, warmup, windows = QUICK["seq"], QUICK["batch"], QUICK["warmup"], QUICK["windows"]
    return model, seq, batch, warmup, windows, mfu


def trainer_step_rate(
    model: dict, seq: int, batch: int, device: torch.device, warmup: int, windows: tuple[int, int], *overrides: str
) -> dict:
    """The trainer's step as `trainer train` builds it (ddp engine, one process), timed on random ids handed over as
    the loop hands them; its peak memory (CUDA: the allocator's peak since before the build; CPU: PyTorch's MemTracker over one step) and
    the memory formula's prediction for the same config."""
    from trainer.build import build_model, model_flops_per_token, resolve_model
    from trainer.loop import pinned
    from trainer.parallel import ParallelDims
    from trainer.plan.measure import measure_step
    from trainer.plan.memory import predict_run

    cfg = config(model, seq, batch, "train.lr=1e-4", *overrides)
    model_cfg = resolve_model(cfg, token_stub(model["vocab_size"]))
    predicted = predict_run(cfg, model_cfg, 1)
    dims = ParallelDims(world_size=1, rank=0, local_rank=0, dp=1)
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine, counts = build_model(cfg, dims, device, model_cfg)
    engine.train()
    # on the host, page-locked, as the loop hands them over: the engine copies them without blocking, and counts the
    # targets on the host (ids already on the GPU would make that count wait for the device every step)
    batches = [pinned(b, device) for b in random_batches(model["vocab_size"], seq, batch, 1)]

    def step() -> None:
        loss_sum, _ = engine.train_step(batches)
        engine.step(1e-4, loss_finite=torch.isfinite(loss_sum))

    rates = timed_rates(step, batch * seq, device, warmup, *windows)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = measure_step(engine, batches)["peak"]
    out = {
        "tokens_per_s": statistics.median(rates),
        "flops_per_token": model_flops_per_token(model_cfg, counts, seq),
        "peak_bytes": peak,
        "predicted_bytes": predicted.peak if predicted else None,
        "predicted_at": predicted.peak_at if predicted else None,
        "model_cfg": model_cfg,
        "precision": cfg.train.precision,
        "compile": cfg.train.compile,
    }
    return out  # the engine goes with this frame


class PeerLoop:
    """transformers' model of the same dims (the family's Hugging Face config; as many vocabulary rows as the
    trainer's padded head), model and loss under one torch.compile, fused AdamW on CUDA, autocast as the trainer."""

    def __init__(self, model_cfg, seq: int, batch: int, device: torch.device, precision: str, compile: bool) -> None:
        import torch.nn.functional as F

        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise RuntimeError(
                "the comparison needs transformers: pip install -e '.[dev]' (make install does)"
            ) from None

        from trainer.engines.base import DTYPES
        from trainer.models import family

        hf = family(model_cfg.arch).adapter.config_to_hf(model_cfg)
        hf["vocab_size"] = getattr(model_cfg, "padded_vocab_size", model_cfg.vocab_size)
        hf_config = AutoConfig.for_model(hf.pop("model_type"), **hf)
        torch.manual_seed(0)
        with torch.device(device):
            self.model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        self.model.train()
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
        self.device, self.dtype = device, DTYPES[precision]

        def loss_fn(x, y):
            return F.cross_entropy(self.model(input_ids=x).logits.flatten(0, 1), y.flatten())

        self.loss = torch.compile(loss_fn) if compile else loss_fn
        ids = torch.randint(4, model_cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
        self.x, self.y = ids[:, :-1].to(device), ids[:, 1:].to(device)

    def step(self) -> None:
        ctx = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with ctx:
            loss = self.loss(self.x, self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def peer_step_rate(trainer: dict, seq: int, batch: int, device: torch.device, warmup: int, windows) -> float:
    free(device)  # the trainer's model is gone: its compiled graphs and cached memory too
    peer = PeerLoop(trainer["model_cfg"], seq, batch, device, trainer["precision"], trainer["compile"])
    rates = timed_rates(peer.step, batch * seq, device, warmup, *windows)
    del peer
    free(device)
    return statistics.median(rates)


def throughput_rows(name: str, trainer: dict, peer_rate: float, peak: float, mfu_target: float | None, quick: bool):
    """tokens/s against the peer, MFU, peak memory against the plan. Quick shapes report speed without judging it."""
    from trainer.metrics import mfu

    ratio = trainer["tokens_per_s"] / peer_rate
    ours, theirs = (mfu(r, trainer["flops_per_token"], peak) for r in (trainer["tokens_per_s"], peer_rate))
    speed = f"{ratio:.2f}x ({trainer['tokens_per_s']:,.0f} vs {peer_rate:,.0f} tokens/s)"
    mfu_fig = f"{100 * ours:.1f}% (transformers {100 * theirs:.1f}%) of {flops(peak)}"
    rows = []
    if quick:
        rows.append(Row(f"{name} tokens/s vs transformers+compile", speed, "quick shapes: not judged", INFO))
        rows.append(Row(f"{name} MFU", mfu_fig, "quick shapes: not judged", INFO))
    else:
        rows.append(judged(f"{name} tokens/s vs transformers+compile", speed, ">= 1.0x", ratio >= 1.0))
        if mfu_target is None:
            rows.append(Row(f"{name} MFU", mfu_fig, "reported", INFO))
        else:
            rows.append(judged(f"{name} MFU", mfu_fig, f"> {100 * mfu_target:.0f}%", ours > mfu_target))
    rows.append(memory_row(name, trainer["peak_bytes"], trainer["predicted_bytes"], trainer["predicted_at"]))
    return rows


def memory_row(name: str, measured: int, predicted: int | None, at: str | None) -> Row:
    check = f"{name} peak memory vs trainer plan"
    if not predicted:
        return Row(check, f"measured {measured / 2**30:,.2f} GiB; the plan has no prediction", "within 10%", FAIL)
    gap = measured / predicted - 1
    figure = f"{measured / 2**30:,.2f} GiB vs predicted {predicted / 2**30:,.2f} GiB ({100 * gap:+.1f}%, at {at})"
    return judged(check, figure, "within 10%", within(measured, predicted, 0.10))


def model_task(name: str) -> Callable:
    def task(ctx) -> list[Row]:
        model, seq, batch, warmup, windows, mfu_target = shape_of(name, ctx.quick)
        extra = ["train.precision=bf16", "train.compile=true"]
        trainer = trainer_step_rate(model, seq, batch, ctx.device, warmup, windows, *extra)
        peer = peer_step_rate(trainer, seq, batch, ctx.device, warmup, windows)
        from trainer.metrics import peak_flops

        return throughput_rows(name, trainer, peer, peak_flops(ctx.device, torch.bfloat16)[0], mfu_target, ctx.quick)

    return task


# ------------------------------------------------------------------------------------------------------ parity

PARITY_MODEL = {"arch": "gpt", "n_layer": 2, "n_head": 4, "d_model": 128, "vocab_size": 2048, "max_seq_len": 128}
PARITY_SHAPE = {"seq": 128, "batch": 4, "steps": 3}


def run_layout(dims, device: torch.device, precision: str, engine_name: str, step_batches: list[list[dict]]) -> dict:
    """Per-step global loss and grad norm of the trainer's engine on `step_batches` (each a global batch of one
    micro-batch; this rank trains the samples whose index is its dp rank modulo dp, as the data order does)."""
    from trainer.build import build_model, resolve_model
    from trainer.parallel import all_reduce_sum

    s = PARITY_SHAPE
    cfg = config(PARITY_MODEL, s["seq"], s["batch"], f"train.precision={precision}", f"parallel.engine={engine_name}")
    model_cfg = resolve_model(cfg, token_stub(PARITY_MODEL["vocab_size"]))
    engine, _ = build_model(cfg, dims, device, model_cfg)
    engine.train()
    losses, norms = [], []
    for batches in step_batches:
        mine = [{k: v[dims.dp_rank :: dims.dp] for k, v in b.items()} for b in batches]
        loss_sum, targets = engine.train_step(mine)
        loss = all_reduce_sum(loss_sum.reshape(1), dims, "world")[0] / targets
        norm, _ = engine.step(1e-3, loss_finite=torch.isfinite(loss))
        losses.append(float(loss))
        norms.append(float(norm))
    del engine
    return {"loss": losses, "grad_norm": norms}


def parity_batches() -> list[list[dict]]:
    s = PARITY_SHAPE
    return [[b] for b in random_batches(PARITY_MODEL["vocab_size"], s["seq"], s["batch"], s["steps"], seed=1)]


def parity(device: torch.device) -> dict:
    """One process without a process group (fp32 and bf16), then a process group of one (NCCL on GPUs, as
    `trainer train` joins it for fsdp), checked with an all-reduce: fsdp ZeRO-3 and ddp in fp32, fsdp in bf16."""
    import torch.distributed as dist

    from trainer.parallel import ParallelDims, init_distributed, shutdown_distributed

    steps = parity_batches()
    alone = ParallelDims(world_size=1, rank=0, local_rank=0, dp=1)
    out = {"single": run_layout(alone, device, "fp32", "ddp", steps)}
    out["single-bf16"] = run_layout(alone, device, "bf16", "ddp", steps)
    dims, got = init_distributed(1, need_group=True)
    try:
        if got.type != device.type:
            raise RuntimeError(f"the process group joined {got}, not {device}")
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)
        out["backend"] = dist.get_backend()
        out["all_reduce"] = float(probe)
        out["fsdp"] = run_layout(dims, device, "fp32", "fsdp", steps)
        out["ddp"] = run_layout(dims, device, "fp32", "ddp", steps)
        out["fsdp-bf16"] = run_layout(dims, device, "bf16", "fsdp", steps)
    finally:
        shutdown_distributed()
    return out


def rel_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x / y - 1) if y else abs(x) for x, y in zip(a, b))


def parity_rows(result: dict, where: str) -> list[Row]:
    rows = []
    for name in ("fsdp", "ddp"):
        if name not in result:
            continue
        loss, norm = (
            rel_gap(result[name]["loss"], result["single"]["loss"]),
            rel_gap(result[name]["grad_norm"], result["single"]["grad_norm"]),
        )
        rows.append(
            judged(
                f"{name} {where} vs one process, fp32",
                f"losses {', '.join(f'{x:.4f}' for x in result[name]['loss'])}; largest gap loss {loss:.1e}, "
                f"grad norm {norm:.1e} (relative)",
                "<= 1e-4 each step",
                loss <= 1e-4 and norm <= 1e-4,
            )
        )
    if "fsdp-bf16" in result:
        gap = max(abs(x - y) for x, y in zip(result["fsdp-bf16"]["loss"], result["single-bf16"]["loss"]))
        rows.append(
            judged(
                f"fsdp {where} vs one process, bf16",
                f"largest loss gap {gap:.4f} (mixed-precision policy vs autocast)",
                "<= 0.05",
                gap <= 0.05,
            )
        )
    return rows


def parity_task(ctx) -> list[Row]:
    result = parity(ctx.device)
    where = f"world 1 ({result['backend']})"
    ok = result["all_reduce"] == 1.0
    rows = [judged("process group of one", f"{result['backend']} all_reduce gave {result['all_reduce']}", "1.0", ok)]
    return rows + parity_rows(result, where)


def parity_worker(out: Path) -> None:
    """One rank of the 2-GPU parity row (under torchrun): fsdp and ddp on dp 2; rank 0 writes the losses."""
    from trainer.parallel import init_distributed, shutdown_distributed

    dims, device = init_distributed(1, need_group=True)
    steps = parity_batches()
    result = {name: run_layout(dims, device, "fp32", name, steps) for name in ("fsdp", "ddp")}
    result["backend"] = torch.distributed.get_backend()
    if dims.is_main:
        out.write_text(json.dumps(result))
    shutdown_distributed()


def parity_2gpu_task(ctx) -> list[Row]:
    if ctx.gpus < 2:
        return [skipped("fsdp, ddp on 2 GPUs vs one process", f"needs 2 GPUs, this machine has {ctx.gpus}")]
    from trainer.parallel import ParallelDims

    single = run_layout(
        ParallelDims(world_size=1, rank=0, local_rank=0, dp=1), ctx.device, "fp32", "ddp", parity_batches()
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "parity.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        cmd += [str(Path(__file__).resolve()), "--worker", "parity", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"torchrun exited {proc.returncode}: {error_line(proc.stderr)}")
        result = json.loads(out.read_text())
    result["single"] = single
    return parity_rows(result, f"2 ranks ({result['backend']})")


# ------------------------------------------------------------------------------------------------ cp attention


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute error relative to the reference's largest magnitude."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def attention_kernels(fn: Callable[[], object]) -> list[str]:
    """The attention ops that ran in `fn` (torch.profiler's CPU-side op names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "attention" in n and n.startswith("aten::_"))


def attention_errors(case: tuple[int, int, int], degree: int, rank: int, chunk: int, device: torch.device) -> dict:
    """For one rank of a cp degree: the errors of context parallelism's attention (`block_causal`, its lower-right
    path, in bf16) and of one bf16 causal attention, both against one fp32 causal attention (math kernel) over the
    whole sequence, on the rank's rows: output and the q, k, v gradients. Also the attention ops its bf16 run used."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from trainer.parallel.context_parallel import _chunk_positions, block_causal

    h, h_kv, d = case
    torch.manual_seed(degree * 10 + rank)
    t = 2 * degree * chunk
    q, k, v = (torch.randn(1, n, t, d, device=device) for n in (h, h_kv, h_kv))
    rows = _chunk_positions(rank, degree, 2 * chunk).to(device)
    grad = torch.randn(1, h, 2 * chunk, d, device=device)

    def attend(fn, dtype: torch.dtype) -> list[torch.Tensor]:
        x = [a.to(dtype).requires_grad_() for a in (q, k, v)]
        o = fn(*x)
        return [o, *torch.autograd.grad(o, x, grad.to(dtype))]

    def whole(q_, k_, v_):
        out = torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)
        return out[..., rows, :]

    def cp(q_, k_, v_):
        return block_causal(q_[..., rows, :], k_, v_, (rank, 2 * degree - 1 - rank), enable_gqa=True, flash=False)

    with sdpa_kernel(SDPBackend.MATH):
        want = attend(whole, torch.float32)
    plain = attend(whole, torch.bfloat16)
    got = attend(cp, torch.bfloat16)
    names = ("out", "dq", "dk", "dv")
    return {
        "cp": {n: max_error(g, w) for n, g, w in zip(names, got, want)},
        "plain": {n: max_error(g, w) for n, g, w in zip(names, plain, want)},
        "kernels": attention_kernels(lambda: attend(cp, torch.bfloat16)),
    }


# Errors are relative to the reference's largest magnitude. The cp path adds bf16 roundings to sums one attention's
# kernel keeps in fp32: a key's gradient summed over the rank's two query chunks (and, where a kernel has no native
# grouped-query heads, over each group's query heads): each at most 2^-9 of the sum, together under 2^-7 of the
# largest magnitude.
CP_SLACK = 2.0**-7
CP_CASES = {"MHA 12x64": (12, 12, 64), "GQA 32/8x64": (32, 8, 64)}  # heads, kv heads, head dim
CP_RANKS = ((2, 0), (2, 1), (4, 0), (4, 3))  # (degree, rank): both ranks of cp2, the first and last of cp4


def cp_attention(device: torch.device, quick: bool) -> dict:
    """`attention_errors` for every case and (degree, rank), chunks of 512 tokens (128 with --quick): per case, the
    errors by rank and the attention ops of its last rank's run."""
    chunk = 128 if quick else 512
    out = {}
    for case, shape in CP_CASES.items():
        ranks = {}
        for degree, rank in CP_RANKS:
            r = attention_errors(shape, degree, rank, chunk, device)
            ranks[f"cp{degree} rank {rank}"] = {"cp": r["cp"], "plain": r["plain"]}
        out[case] = {"ranks": ranks, "kernels": r["kernels"], "chunk": chunk}
    return out


def cp_rows(result: dict, device: torch.device) -> list[Row]:
    """Per case: the largest errors over its ranks against one attention's, judged by the largest excess; and the
    kernels (judged on CUDA: flash or memory-efficient, never the math kernel over a materialised mask)."""
    rows = []
    for case, r in result.items():
        ranks = r["ranks"]
        excess, where = max((e["cp"][n] - e["plain"][n], f"{k} {n}") for k, e in ranks.items() for n in e["cp"])
        worst = {
            n: (max(e["cp"][n] for e in ranks.values()), max(e["plain"][n] for e in ranks.values()))
            for n in next(iter(ranks.values()))["cp"]
        }
        figure = ", ".join(f"{n} {cp:.1e} ({plain:.1e})" for n, (cp, plain) in worst.items())
        rows.append(
            judged(
                f"cp attention {case}, bf16 ({', '.join(ranks)}; chunks of {r['chunk']})",
                f"largest error (one attention's): {figure}; most above one attention's {excess:+.1e} ({where})",
                f"each <= one bf16 causal attention's + {CP_SLACK:.1e}",
                excess <= CP_SLACK,
            )
        )
        fast = [n for n in r["kernels"] if "flash" in n or "efficient" in n]
        masked = [n for n in r["kernels"] if "math" in n]
        figure = ", ".join(r["kernels"]) or "none recorded"
        if device.type == "cuda":
            rows.append(
                judged(f"cp attention {case} kernels", figure, "flash or efficient, no math", bool(fast) and not masked)
            )
        else:
            rows.append(Row(f"cp attention {case} kernels", figure, "CUDA only", INFO))
    return rows


def cp_task(ctx) -> list[Row]:
    return cp_rows(cp_attention(ctx.device, ctx.quick), ctx.device)


# ------------------------------------------------------------------------------------------- async checkpoint

ASYNC_MARK = "ASYNC_CKPT_BENCH_RESULT "


def async_checkpoint(quick: bool, saves: int = 2) -> dict:
    """bench/async_checkpoint.py's worker as one rank under torchrun (FSDP ZeRO-3; staging in pinned host memory on
    a GPU): the step blocked by each save, sync and async (the first async save, which allocates the staging copy,
    left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
        cmd += [str(REPO / "bench" / "async_checkpoint.py"), "--worker", str(Path(tmp) / "ckpt"), "--saves", str(saves)]
        cmd += ["--quick"] if quick else []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(ASYNC_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench/async_checkpoint.py worker exited {proc.returncode}: {error_line(proc.stderr)}")
    (rank,) = json.loads(lines[-1][len(ASYNC_MARK) :])
    timed = [a for a in rank["async"] if not a["warmup"]]
    return {
        "sync": statistics.median(rank["sync"]),
        "blocked": statistics.median(a["blocked"] for a in timed),
        "first": rank["async"][0]["blocked"],
        "base_step": rank["base_step"],
        "n_params": rank["n_params"],
    }


def async_rows(r: dict, quick: bool = False) -> list[Row]:
    ratio = r["blocked"] / r["sync"]
    check, target = "checkpoint.async, pinned staging", "<= 25% of a sync save"
    figure = (
        f"blocked {r['blocked']:.3f} s vs sync {r['sync']:.3f} s per save ({100 * ratio:.1f}%; first async save "
        f"{r['first']:.2f} s; step {r['base_step']:.3f} s; {r['n_params'] / 1e6:.1f}M params, fsdp ZeRO-3)"
    )
    if quick:
        return [Row(check, figure, "quick shapes: not judged", INFO)]
    return [judged(check, figure, target, ratio <= 0.25)]


def async_task(ctx) -> list[Row]:
    return async_rows(async_checkpoint(ctx.quick), ctx.quick)


# -------------------------------------------------------------------------------------------------- profiling


def profile_runs(work: Path, env: dict | None = None) -> dict:
    """`trainer train` twice: a tiny GPT with profile.steps=[2,3] and profile.memory_snapshot=true, and a model too
    big for the GPU (its materialisation runs out of memory) with memory_snapshot on."""
    import yaml

    from trainer.tokenizer import train_tokenizer

    corpus = work / "corpus.txt"
    corpus.write_text((REPO / "data" / "shakespeare" / "train.txt").read_text()[:200_000])
    tok = train_tokenizer("bpe", 512, [str(corpus)], work / "tok")
    base = {
        "model": {"arch": "gpt", "preset": "gpt-tiny", "vocab_size": 512, "max_seq_len": 64},
        "data": {"train": [str(corpus)], "format": "text", "tokenizer": str(tok), "seq_len": 64},
        "train": {"steps": 4, "micro_batch": 4, "warmup_steps": 1, "eval_every": 0, "precision": "bf16"},
        "checkpoint": {"every": 0, "resume": "never"},
        "log": {"every": 1, "wandb": {"mode": "disabled"}},
        "profile": {"memory_snapshot": True},
    }
    out = {}
    for name, extra in {
        "traced": {"run": {"dir": str(work / "traced")}, "profile": {"steps": [2, 3], "memory_snapshot": True}},
        "oom": {
            "run": {"dir": str(work / "oom")},
            "model": {
                "arch": "gpt",
                "n_layer": 4,
                "n_head": 32,
                "d_model": 32768,
                "vocab_size": 512,
                "max_seq_len": 64,
            },
        },
    }.items():
        cfg = {**base, **extra}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.run(
            [sys.executable, "-m", "trainer", "train", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            check=False,
        )
        out[name] = {"rc": proc.returncode, "stderr": proc.stderr, "dir": work / name}
    return out


def trace_events(path: Path) -> tuple[set[str], set[str]]:
    """(event names, event categories) of a Chrome trace."""
    events = json.loads(path.read_text())["traceEvents"]
    return {e.get("name", "") for e in events}, {e.get("cat", "") for e in events}


def profile_rows(runs: dict, device: torch.device) -> list[Row]:
    import pickle

    rows = []
    traced = runs["traced"]
    trace, snap = (
        traced["dir"] / "profile" / "rank0_step2-3.json",
        traced["dir"] / "profile" / "rank0_memory_step3.pickle",
    )
    if traced["rc"] != 0:
        tail = error_line(traced["stderr"])
        rows.append(
            Row("profile.steps=[2,3] + memory_snapshot", f"trainer exited {traced['rc']}: {tail}", "exit 0", FAIL)
        )
    else:
        names, cats = trace_events(trace) if trace.exists() else (set(), set())
        steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
        kernels = "kernel" in cats
        rows.append(
            judged(
                "profile.steps=[2,3] trace",
                f"{trace.name}: {', '.join(steps) or 'no step ranges'}; CUDA kernels {'in' if kernels else 'not in'} it",
                "ProfilerStep#2, #3 and CUDA kernels",
                steps == ["ProfilerStep#2", "ProfilerStep#3"] and (kernels or device.type != "cuda"),
            )
        )
        ok = snap.exists() and "segments" in pickle.loads(snap.read_bytes())
        rows.append(judged("profile.memory_snapshot", f"{snap.name} {'loads' if ok else 'missing'}", "a snapshot", ok))
    oom = runs["oom"]
    lines = [x for x in oom["stderr"].strip().splitlines() if x.startswith("error:")]
    dumped = sorted(p.name for p in (oom["dir"] / "profile").glob("rank0_memory_oom*.pickle"))
    ok = oom["rc"] == 2 and len(lines) == 1 and "out of memory" in lines[0] and "Traceback" not in oom["stderr"]
    rows.append(
        judged(
            "out of memory: one line + snapshot",
            f"exit {oom['rc']}: {(lines or ['no error line'])[-1][:120]}; snapshot {', '.join(dumped) or 'none'}",
            "exit 2, one line, rank0_memory_oom*.pickle",
            ok and bool(dumped),
        )
    )
    return rows


def profile_task(ctx) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        return profile_rows(profile_runs(Path(tmp)), ctx.device)


# ------------------------------------------------------------------------------------------------------- main

TASKS: dict[str, Callable] = {
    "env": lambda ctx: env_rows(environment(ctx.device)),
    "gpt2-small": model_task("gpt2-small"),
    "llama3.2-1b": model_task("llama3.2-1b"),
    "parity": parity_task,
    "parity-2gpu": parity_2gpu_task,
    "cp-attention": cp_task,
    "async-checkpoint": async_task,
    "profile": profile_task,
}


def run_tasks(names: list[str], ctx, tasks: dict[str, Callable] = TASKS, say=print) -> list[Row]:
    """Each task in turn, isolated: one that raises is a FAIL row with its error's first line, and the next runs."""
    rows: list[Row] = []
    for name in names:
        t0 = time.perf_counter()
        try:
            got = tasks[name](ctx)
        except Exception as e:  # noqa: BLE001 - a failed row must not stop the others
            got = [Row(name, first_line(e), "runs", FAIL)]
        finally:
            with contextlib.suppress(Exception):
                free(ctx.device)
        if got:
            got[0].seconds = time.perf_counter() - t0
        for r in got:
            say(f"  {r.result:4}  {r.check}: {r.figure}", flush=True)
        rows += got
    return rows


def parse_rows(text: str | None) -> list[str]:
    """The tasks `--rows` names (all by default); one line naming the known ones for anything else."""
    if not text:
        return list(TASKS)
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in TASKS]
    if unknown:
        raise SystemExit(f"gpu_check: unknown row {unknown[0]!r}: choose from {', '.join(TASKS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", help=f"comma-separated rows to run (default all): {', '.join(TASKS)}")
    p.add_argument("--quick", action="store_true", help="smaller shapes; speed rows reported, not judged")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        parity_worker(Path(args.worker[1]))
        return 0
    try:
        names = parse_rows(args.rows)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "gpu_check needs a GPU: torch sees none here (torch.cuda.is_available() is false); run it on a machine with "
            "an NVIDIA GPU and a CUDA build of torch",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.set_float32_matmul_precision("high")  # as `trainer train` sets it on GPUs
    ctx = SimpleNamespace(device=device, quick=args.quick, gpus=torch.cuda.device_count())
    t0 = time.perf_counter()
    print(
        f"gpu_check {datetime.date.today()}: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
        f"{' (quick shapes)' if args.quick else ''}; rows {', '.join(names)}",
        flush=True,
    )
    rows = run_tasks(names, ctx)
    print(f"\n{format_table(rows)}\n\n{time.perf_counter() - t0:.0f} s in all", flush=True)
    status = exit_status(rows)
    failed = [r.check for r in rows if r.result == FAIL]
    print(f"FAILED: {', '.join(failed)}" if failed else "every row that ran passed", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
