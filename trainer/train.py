"""The pretraining loop: build everything from the config, then step, log, evaluate and checkpoint.

One step trains global samples [s*G, (s+1)*G), G = micro_batch * grad_accum * dp. The loss of every micro-batch is
its summed token loss divided by the target tokens of the whole global batch, so any micro_batch / grad_accum / world
size split of the same global batch gives the same update.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from trainer.checkpoint import Checkpointer, file_sha256, set_rng_state
from trainer.config import Config, save_config
from trainer.data import SampleStream, Source, build_stream, merge_states, parse_sources
from trainer.engines import Engine, build_engine
from trainer.engines.base import DTYPES
from trainer.engines.deepspeed import deepspeed_config
from trainer.errors import SharedError, UserError
from trainer.evaluate import evaluate, generate_sample
from trainer.metrics import flops_per_token, mem_peak_gb, mfu, peak_flops
from trainer.models import ModelConfig, count_params, model_from_config, resolve_model_config
from trainer.monitor import MetricsLogger
from trainer.optim import OptimizerSettings, lr_at
from trainer.parallel import (
    ParallelDims,
    all_reduce_sum,
    broadcast_object,
    check_tp_degree,
    full_value,
    init_distributed,
    parallelize,
    shutdown_distributed,
)
from trainer.parallel.health import Heartbeat, is_collective_failure
from trainer.run_lock import RunLock
from trainer.stop import StopSignal
from trainer.tokenizer import TokenizerInfo, load_tokenizer


@dataclass
class TrainState:
    """Counters saved in every checkpoint besides model, optimizer and RNG."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed (global)
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss or gradient
    data: dict = field(default_factory=dict)  # the train stream's position (empty: the beginning)
    wandb_run_id: str | None = None


@dataclass
class Throughput:
    """Time, tokens and data wait accumulated between two logged steps."""

    time: float = 0.0
    tokens: int = 0
    data_wait: float = 0.0
    steps: int = 0

    def add(self, seconds: float, tokens: int, data_wait: float) -> None:
        self.time, self.tokens = self.time + seconds, self.tokens + tokens
        self.data_wait, self.steps = self.data_wait + data_wait, self.steps + 1

    def take(self) -> dict:
        """Averages over the window, which then starts again."""
        out = {
            "tokens_per_s": self.tokens / self.time,
            "step_time_s": self.time / self.steps,
            "data_wait_s": self.data_wait / self.steps,
        }
        self.time, self.tokens, self.data_wait, self.steps = 0.0, 0, 0.0, 0
        return out


@dataclass
class Run:
    """Everything one rank builds from the config before the first step."""

    cfg: Config
    dims: ParallelDims
    device: torch.device
    tok: TokenizerInfo
    model_cfg: ModelConfig
    engine: Engine
    ckpt: Checkpointer
    logger: MetricsLogger
    state: TrainState
    rng: dict | None  # the RNG state to continue from, when resuming
    train_sources: list[Source]
    valid_sources: list[Source]  # empty: no evaluation
    flops_per_token: float
    peak_flops: float  # of all ranks together
    stream: SampleStream  # this rank's training batches (workers started before the model was built)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.micro_batch * self.cfg.train.grad_accum * self.dims.dp


def resolve_model(cfg: Config, tok: TokenizerInfo) -> ModelConfig:
    """The model shape: preset, then explicit dims; vocab_size defaults to the tokenizer's."""
    m = cfg.model
    dims = {
        k: getattr(m, k)
        for k in ("n_layer", "n_head", "d_model", "d_ff", "vocab_size", "max_seq_len", "dropout")
        if getattr(m, k) is not None
    }
    dims.setdefault("vocab_size", tok.vocab_size)
    mc = resolve_model_config(m.arch, m.preset, **dims)
    if tok.vocab_size > mc.vocab_size:
        raise UserError(
            f"tokenizer {cfg.data.tokenizer} has {tok.vocab_size} tokens but model.vocab_size is "
            f"{mc.vocab_size}: raise model.vocab_size to at least {tok.vocab_size} or leave it unset"
        )
    if cfg.data.seq_len > mc.max_seq_len:
        raise UserError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's {mc.max_seq_len} positions: lower "
            f"data.seq_len or raise model.max_seq_len"
        )
    needed = ["eos_id"] if mc.arch == "gpt" else ["cls_id", "sep_id", "mask_id"]
    if any(getattr(tok, k) is None for k in needed):
        kind = "bpe" if mc.arch == "gpt" else "wordpiece"
        raise UserError(
            f"tokenizer {cfg.data.tokenizer} lacks the special tokens a {mc.arch} model needs: train one "
            f"with `trainer tokenizer --kind {kind}`"
        )
    return mc


def data_sources(cfg: Config) -> tuple[list[Source], list[Source]]:
    """The train and valid sources of the config (paths resolved, formats detected: errors before anything starts)."""
    d = cfg.data
    train = parse_sources(d.train, d.format, d.text_field)
    valid = parse_sources(d.valid, d.format, d.text_field, key="data.valid") if d.valid else []
    if d.valid_fraction:
        if len(train) != 1 or not train[0].raw:
            raise UserError(
                "data.valid_fraction holds out documents of one raw source (text, jsonl, parquet, datasets); with "
                "several sources or prepared shards give data.valid instead"
            )
        valid = train
    return train, valid


def describe_data(cfg: Config, sources: list[Source], dp: int) -> str:
    """One line: the sources with their shares and formats, the order, and what each rank reads."""
    total = sum(src.weight for src in sources)
    parts = [
        f"{src.name} {100 * src.weight / total:.0f}% ({src.fmt}, {src.describe() if src.fmt == 'dataset' else len(src.paths)}"
        f"{'' if src.fmt == 'dataset' else ' file' + ('s' if len(src.paths) > 1 else '')})"
        for src in sources
    ]
    L = cfg.data.streams
    share = f"{L // dp} per rank" if L % dp == 0 else "every rank reads all: not a multiple of dp"
    order = "shuffled" if cfg.data.shuffle else "corpus order"
    return f"data: {', '.join(parts)} | {order}, {L} streams per raw source ({share}), {cfg.data.num_workers} worker(s)"


def build_data_stream(
    cfg: Config,
    dims: ParallelDims,
    sources: list[Source],
    *,
    training: bool,
    state: dict | None = None,
    num_workers: int = 0,
    micro_batch: int,
    start_sample: int = 0,
):
    """This data-parallel rank's micro-batches of `sources`: the training order (shuffled, from the saved position
    `state`) or the evaluation order (never shuffled, from the start; the held-out documents under valid_fraction)."""
    d = cfg.data
    holdout = (d.valid_fraction, not training) if d.valid_fraction else None
    return build_stream(
        sources,
        tokenizer_path=d.tokenizer,
        arch=cfg.model.arch,
        seq_len=d.seq_len,
        seed=cfg.run.seed,
        dp_rank=dims.dp_rank,
        dp_size=dims.dp,
        micro_batch=micro_batch,
        shuffle=d.shuffle and training,
        streams=d.streams,
        block=d.shuffle_block if training else 1,  # unshuffled, blocks only add read-ahead: evaluation reads little
        num_workers=num_workers,
        bad_lines=d.bad_lines,
        state=state or None,
        holdout=holdout,
        start_sample=start_sample,
        warn=training,
    )


def gather_data_state(stream, dims: ParallelDims) -> dict:
    """The global data position: every rank knows the cursors of its own logical streams only."""
    local = stream.state_dict()
    if dims.world_size == 1 or not dist.is_initialized():
        return merge_states([local])
    states: list = [None] * dims.world_size
    dist.all_gather_object(states, local)
    return merge_states(states)


def pinned(batch: dict, device: torch.device) -> dict:
    """On CUDA, the batch in page-locked memory, so that its copy to the device is asynchronous (non_blocking)."""
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch


def train_step(
    engine: Engine, batches: list[dict], dims: ParallelDims, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the step's micro-batches; returns (this dp rank's summed loss, global target tokens), both
    0-dim device tensors: nothing here waits for the device.

    Each micro-batch's summed token loss is divided by the target tokens of the whole global batch; the engine sums
    gradients over dp ranks, so the update is the global-batch token mean however the batch is split."""
    local_targets = sum(int((b["labels"] != -100).sum()) for b in batches)  # counted on the host, before the copy
    global_targets = all_reduce_sum(torch.tensor([float(local_targets)], device=device), dims, "dp")[0]
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for i, batch in enumerate(batches):
        labels = batch["labels"].to(device, non_blocking=True)
        with engine.micro_batch(last=i == len(batches) - 1):
            loss = engine.forward(batch["input_ids"].to(device, non_blocking=True), labels)
            engine.backward(loss / global_targets)
        loss_sum += full_value(loss.detach())
    return loss_sum, global_targets


def stop_requested(stop: StopSignal, dims: ParallelDims) -> bool:
    """Whether any rank got a stop signal. The flag is a CPU tensor, reduced by gloo (also beside NCCL on GPUs): the
    host learns it every step without waiting for the device."""
    return all_reduce_sum(torch.tensor([float(stop.received)]), dims, "world").item() > 0


def run_evaluation(run: Run, step: int) -> dict:
    """Validation loss over eval_steps global batches from the start of the valid corpus; a GPT sample. Every rank
    takes part (under FSDP and tensor parallelism the forward is collective)."""
    cfg, dims = run.cfg, run.dims
    stream = build_data_stream(cfg, dims, run.valid_sources, training=False, micro_batch=cfg.train.micro_batch)
    micro_batches = cfg.train.eval_steps * cfg.train.grad_accum  # the same samples whatever the layout
    result = {"step": step, **evaluate(run.engine, iter(stream), micro_batches, dims, run.device)}
    stream.close()
    if cfg.model.arch == "gpt":
        result.pop("val_accuracy")  # next-token accuracy is not a figure GPT users read
    run.logger.log_eval(result)
    if cfg.model.arch == "gpt" and cfg.train.sample_tokens:
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


def train(cfg: Config, stop: StopSignal | None = None) -> dict:
    """Runs (or resumes) the configured run on this rank; returns the last logged metrics. `stop` is the StopSignal
    the caller installed as early as it could (the CLI does, before loading the config): a stop signal during
    start-up then ends the run before its first step, with a line, instead of killing the process silently."""
    stop = stop or StopSignal()
    try:
        return _train(cfg, stop)
    finally:
        stop.restore()


def _train(cfg: Config, stop: StopSignal) -> dict:
    p = cfg.parallel
    tok = load_tokenizer(cfg.data.tokenizer)
    model_cfg = resolve_model(cfg, tok)
    # a degree that cannot split the model is refused before any process group exists
    check_tp_degree(p.tp, model_cfg.n_head, model_cfg.d_ff, model_cfg.vocab_size, cfg.data.seq_len)
    ds_config = engine_config(cfg, model_cfg)
    dims, device = init_distributed(p.tp, need_group=p.engine != "ddp" or p.tp > 1, timeout_s=p.timeout_s)
    if device.type == "cuda":  # fp32 matmuls (precision=fp32, and what autocast leaves in fp32) on TF32 tensor cores
        torch.set_float32_matmul_precision("high")
    heartbeat = Heartbeat(dims, p.timeout_s).start()
    lock = RunLock(cfg.run_dir)
    try:
        run = build_run(cfg, dims, device, tok, model_cfg, ds_config, lock)
        failed = True
        try:
            result = train_loop(run, stop, heartbeat)
            failed = False
            return result
        finally:
            run.logger.close(exit_code=1 if failed else 0)  # a crashed run is marked failed in W&B
    except Exception as e:
        if is_collective_failure(e):  # name the rank that died or hung, not the socket that noticed
            raise heartbeat.failure(e) from None
        raise
    finally:
        heartbeat.stop()
        shutdown_distributed()
        lock.release()


def lock_run_dir(lock: RunLock, dims: ParallelDims) -> None:
    """Rank 0 takes the run directory's lock for the job; a refusal (another job holds it) reaches every rank."""
    refusal = None
    if dims.is_main:
        try:
            lock.acquire()
        except UserError as e:
            refusal = str(e)
    if refusal := broadcast_object(refusal):
        raise SharedError(refusal)


def engine_config(cfg: Config, model_cfg: ModelConfig) -> dict | None:
    """The generated DeepSpeed config (parallel.deepspeed checked against it), or None for the other engines; built
    from the launcher's WORLD_SIZE before any process group exists, so a bad setting stops the run before it starts."""
    p = cfg.parallel
    if p.engine != "deepspeed":
        return None
    dp = int(os.environ.get("WORLD_SIZE", "1")) // p.tp
    return deepspeed_config(cfg.train, p, dp=dp, d_model=model_cfg.d_model)


def check_layout(cfg: Config, dims: ParallelDims, model_cfg: ModelConfig) -> None:
    """Parallel settings that need the world size or the model shape, refused before anything is built."""
    if cfg.parallel.engine == "ddp" and dims.tp > 1 and dims.dp > 1:
        raise UserError(
            f"parallel.engine=ddp combines tensor parallelism only with dp=1 (here dp={dims.dp}, tp={dims.tp}): "
            f"use parallel.engine=fsdp for 2-D (dp x tp) layouts"
        )


def build_model(
    cfg: Config, dims: ParallelDims, device: torch.device, model_cfg: ModelConfig, ds_config: dict | None = None
) -> tuple[Engine, dict]:
    """The engine around the model: built on the meta device (or partitioned as it is built, DeepSpeed ZeRO-3),
    parallelized, then sharded and materialised by the engine: no rank ever holds more than its shard (plus one whole
    parameter while initialising)."""
    t, p = cfg.train, cfg.parallel
    with torch.device("meta"):
        shape_only = model_from_config(model_cfg)
    counts = {
        "n_params": count_params(shape_only),
        "n_params_non_embedding": count_params(shape_only, exclude_embeddings=True),
    }
    engine = build_engine(
        p.engine,
        lambda: model_from_config(model_cfg),
        lambda model: parallelize(model, dims, t.activation_checkpointing, t.compile),
        dims=dims,
        device=device,
        precision=t.precision,
        grad_clip=t.grad_clip,
        optim=OptimizerSettings(lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), eps=t.eps),
        seed=cfg.run.seed,
        zero_stage=p.zero_stage,
        offload=p.offload,
        deepspeed=ds_config,
    )
    return engine, counts


def build_run(
    cfg: Config,
    dims: ParallelDims,
    device: torch.device,
    tok: TokenizerInfo,
    model_cfg: ModelConfig,
    ds_config: dict | None = None,
    lock: RunLock | None = None,
) -> Run:
    """Model, engine, checkpoint state and loggers; resumes from a checkpoint when there is one. `lock` (the run
    directory's) is taken before anything is written there."""
    check_layout(cfg, dims, model_cfg)
    train_sources, valid_sources = data_sources(cfg)
    if lock is not None:
        lock_run_dir(lock, dims)
    ckpt = Checkpointer(cfg.run_dir / "checkpoints", cfg.checkpoint.keep, dims)
    ckpt.clean_partial()  # under the lock: no live job can be writing them
    resume_from = ckpt.find_resume(cfg.checkpoint.resume)
    state, rng = TrainState(), None
    if resume_from is not None:  # refused here, before anything is built or written, if this run cannot continue it
        saved = ckpt.check_resume(
            resume_from, model_cfg.to_dict(), cfg.parallel.engine, cfg.parallel.zero_stage, tok.path
        )
        state = TrainState(**saved["train_state"])
    if dims.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")

    # measured on an idle process: before the data workers start tokenizing beside it
    peak, peak_source = peak_flops(device, DTYPES[cfg.train.precision])
    # The data workers start next: they fork before the model and optimizer exist (no memory of theirs to share)
    # and tokenize the first block of every stream while the model is built and compiled.
    stream = build_data_stream(
        cfg,
        dims,
        train_sources,
        training=True,
        state=state.data,
        num_workers=cfg.data.num_workers,
        micro_batch=cfg.train.micro_batch,
    )
    stream.start()
    try:
        t = cfg.train
        engine, counts = build_model(cfg, dims, device, model_cfg, ds_config)
        if resume_from is not None:
            rng = ckpt.load(resume_from, engine)

        fpt = flops_per_token(
            counts["n_params_non_embedding"],
            model_cfg.n_layer,
            model_cfg.d_model,
            cfg.data.seq_len,
            causal=model_cfg.arch == "gpt",
            vocab_size=model_cfg.vocab_size,
        )
        wb = cfg.log.wandb
        logger = MetricsLogger(
            cfg.run_dir,
            is_main=dims.is_main,
            total_steps=t.steps,
            start_step=state.step,
            wandb_mode=wb.mode,
            wandb_project=wb.project,
            wandb_entity=wb.entity,
            run_name=cfg.run.name,
            config=cfg.to_dict(),
            wandb_run_id=state.wandb_run_id,
        )
        state.wandb_run_id = logger.wandb_run_id
        run = Run(
            cfg=cfg,
            dims=dims,
            device=device,
            tok=tok,
            model_cfg=model_cfg,
            engine=engine,
            ckpt=ckpt,
            logger=logger,
            state=state,
            rng=rng,
            train_sources=train_sources,
            valid_sources=valid_sources,
            flops_per_token=fpt,
            peak_flops=peak * dims.world_size,
            stream=stream,
        )
        layout = engine.layout()
        logger.start(
            {
                **counts,
                "world_size": dims.world_size,
                "dp": dims.dp,
                "tp": dims.tp,
                **layout,
                "global_batch": run.global_batch,
                "global_batch_tokens": run.global_batch * cfg.data.seq_len,
                "flops_per_token": fpt,
                "resumed_from_step": state.step if resume_from else None,
                "resumed_from": str(resume_from) if resume_from else None,
                "arch": model_cfg.arch,
                "preset": cfg.model.preset,
                "device": str(device),
                "precision": t.precision,
                "peak_flops": run.peak_flops,
                "peak_flops_source": peak_source,
                "data_sources": {src.name: src.weight for src in train_sources},
                "data_shuffle": cfg.data.shuffle,
                "data_streams": cfg.data.streams,
            }
        )
        name = model_cfg.arch.upper() + (f" {cfg.model.preset}" if cfg.model.preset else "")
        zero = f" ZeRO-{layout['zero_stage']}" if layout["zero_stage"] else ""
        offloaded = (
            f" (+{layout['offload_bytes'] / 2**20:,.1f} MiB in CPU memory)" if layout.get("offload_bytes") else ""
        )
        logger.print(
            f"{name}: {counts['n_params']:,} parameters | {layout['engine']}{zero}, dp {dims.dp} x tp {dims.tp} on "
            f"{device.type}, offload {layout['offload']}, model state {layout['model_state_bytes'] / 2**20:,.1f} MiB "
            f"per rank{offloaded} | {run.global_batch} x {cfg.data.seq_len} = {run.global_batch * cfg.data.seq_len:,} tokens "
            f"per step | {t.steps:,} steps, {t.precision} | run dir {cfg.run_dir}"
        )
        logger.print(describe_data(cfg, train_sources, dims.dp))
        if resume_from:
            logger.print(f"resumed from {resume_from} at step {state.step}")
        if state.step >= t.steps:
            logger.print(f"the run is complete at step {state.step}: raise train.steps to train further")
        return run
    except BaseException:
        stream.close()  # the workers must not outlive a failed start
        raise


def save_checkpoint(run: Run, stream) -> None:
    run.state.data = gather_data_state(stream, run.dims)  # at a step boundary: the same global position everywhere
    saved = {
        "train_state": vars(run.state).copy(),
        "model_config": run.model_cfg.to_dict(),
        "config": run.cfg.to_dict(),
        "tokenizer_sha256": file_sha256(run.tok.path),  # part of the data contract: checked on resume
    }
    path = run.ckpt.save(run.state.step, run.engine, saved, str(run.tok.path))  # the file, also when given its dir
    run.logger.print(f"checkpoint saved: {path}")


def train_loop(run: Run, stop: StopSignal, heartbeat: Heartbeat) -> dict:
    """Steps until train.steps (or a stop signal): log, evaluate, checkpoint."""
    cfg, t, state, engine, logger = run.cfg, run.cfg.train, run.state, run.engine, run.logger
    step_tokens = run.global_batch * cfg.data.seq_len
    stream = run.stream
    batches_iter = iter(stream)
    # The RNG (dropout) is set last, so nothing in start-up draws from it and a resumed run continues its stream.
    if run.rng is not None:
        set_rng_state(run.rng)
    else:  # dropout streams differ per data-parallel rank; tensor-parallel peers draw the same masks
        torch.manual_seed(cfg.run.seed + 1000 * run.dims.dp_rank)
    engine.train()
    try:
        if stop_requested(stop, run.dims):  # a stop signal came during start-up: nothing trained, nothing to save
            where = f"the checkpoint of step {state.step} is unchanged" if state.step else "no checkpoint was written"
            logger.print(
                f"stop signal received during start-up: stopped before step {state.step + 1}; {where}; the same "
                f"command resumes"
            )
            return {}
        last, window = {}, Throughput()
        # counted on the device, read when the loop reports
        skipped = torch.tensor(state.skipped_steps, dtype=torch.int64, device=run.device)
        bad_in_row = torch.zeros((), dtype=torch.int64, device=run.device)
        while state.step < t.steps:
            t0 = time.perf_counter()
            batches = [pinned(next(batches_iter), run.device) for _ in range(t.grad_accum)]
            t_data = time.perf_counter() - t0
            lr = lr_at(state.step, t.lr, t.min_lr, t.warmup_steps, t.steps)
            loss_sum, global_targets = train_step(engine, batches, run.dims, run.device)
            # the loss summed over dp (tp peers hold the same value, counted once); its finiteness decides the skip
            local_loss = loss_sum.reshape(1) if run.dims.tp_rank == 0 else torch.zeros(1, device=run.device)
            loss = all_reduce_sum(local_loss, run.dims, "world")[0] / global_targets
            grad_norm, applied = engine.step(lr, loss_finite=torch.isfinite(loss))
            skipped += ~applied
            bad_in_row = (bad_in_row + 1) * ~applied
            stop_now = stop_requested(stop, run.dims)
            state.step += 1
            heartbeat.beat(state.step)
            state.tokens += step_tokens
            last_step = state.step == t.steps
            log_now = state.step % cfg.log.every == 0 or last_step or stop_now
            every = cfg.checkpoint.every
            checkpoint_now = bool(every and state.step % every == 0) or last_step or stop_now
            report_now = log_now or checkpoint_now
            if report_now:
                # the one read of device values (a sync on GPUs): when the loop logs or saves, not every step
                loss_v, norm_v, skipped_v, bad_v = torch.stack(
                    [loss.float(), grad_norm.float().to(loss.device), skipped.float(), bad_in_row.float()]
                ).tolist()
                if int(skipped_v) > state.skipped_steps:
                    logger.print(
                        f"step {state.step}: {int(skipped_v) - state.skipped_steps} update(s) skipped since the last "
                        f"report for a non-finite loss or gradient (loss={loss_v}, grad_norm={norm_v}; "
                        f"{int(bad_v)} in a row)"
                    )
                state.skipped_steps = int(skipped_v)
            window.add(time.perf_counter() - t0, step_tokens, t_data)
            if log_now:
                last = {
                    "step": state.step,
                    "tokens": state.tokens,
                    "loss": loss_v,
                    "lr": lr,
                    "grad_norm": norm_v,
                    **window.take(),
                    "mem_peak_gb": mem_peak_gb(run.device),
                    "skipped_steps": state.skipped_steps,
                }
                last["mfu"] = mfu(last["tokens_per_s"], run.flops_per_token, run.peak_flops)
                if len(run.train_sources) > 1:
                    last.update({f"samples_{name}": n for name, n in stream.consumed().items()})
                logger.log_step(last)
            if run.valid_sources and t.eval_every and (state.step % t.eval_every == 0 or last_step):
                run_evaluation(run, state.step)
            if report_now and int(bad_v) >= t.max_bad_steps:
                raise UserError(
                    f"stopped at step {state.step}: {int(bad_v)} steps in a row had a non-finite loss or "
                    f"gradient; lower train.lr, raise train.warmup_steps or use train.precision=bf16"
                )
            if checkpoint_now:
                save_checkpoint(run, stream)
            if stop_now:
                logger.print(f"stop signal received: stopped at step {state.step}; resume with the same command")
                break
    finally:
        stream.close()  # also on errors: the data workers must not outlive this rank
    return last
