"""Assembling a run on one rank from its config: the model's shape and the checks that need it, the engine around the
model, the resume point, the data stream and the loggers, and the start line that says what was built."""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from pathlib import Path

import torch

from trainer.checkpoint import Checkpointer, latest_checkpoint, read_state, resolve_checkpoint_dir
from trainer.config import Config, save_config
from trainer.data.from_config import build_data_stream, data_sources, describe_data
from trainer.engines import Engine, build_engine
from trainer.engines.base import DTYPES
from trainer.engines.deepspeed import deepspeed_config
from trainer.errors import SharedError, UserError
from trainer.init_from import hf_model_dims, load_hf_weights
from trainer.init_from import verify as verify_hf_checkpoint
from trainer.metrics import PeakMeter, flops_per_token
from trainer.models import ModelConfig, count_params, family, model_from_config, resolve_model_config
from trainer.models.registry import run_vocab_multiple
from trainer.monitor import MetricsLogger
from trainer.optim import OptimizerSettings
from trainer.parallel import ParallelDims, broadcast_object, parallelize
from trainer.parallel.dims import check_world
from trainer.parallel.pipeline import PipelinePlan, head_cost_in_blocks, plan_pipeline
from trainer.run import Run, TrainState
from trainer.run_lock import RunLock
from trainer.tokenizer import TokenizerInfo, load_tokenizer

# the formula's categories the start record states (trainer/plan/memory.py)
PREDICTED = ("parameters", "gradients", "optimizer", "gathered", "activations", "logits", "cpu")

# what a tokenizer must have for each objective, and the `trainer tokenizer` kind that has it
NEEDED_TOKENS = {
    "causal": (["eos_id"], "`trainer tokenizer --kind bpe` (or `--kind char`)"),
    "masked": (["cls_id", "sep_id", "mask_id"], "`trainer tokenizer --kind wordpiece`"),
}


def resolve_model(cfg: Config, tok: TokenizerInfo) -> ModelConfig:
    """The model shape: preset, then explicit dims; vocab_size defaults to the tokenizer's, its rows padded for
    tensor parallelism (`run_vocab_multiple`)."""
    m = cfg.model
    dims = {k: v for k, v in m.dims.items() if v is not None}
    requested = dims.pop("vocab_multiple", None)
    if m.init_from:  # the checkpoint's config.json sets the shape
        dims = hf_model_dims(m.init_from, m.arch, dims, m.preset)
        mc = resolve_model_config(m.arch, None, **dims)
    else:
        dims.setdefault("vocab_size", tok.vocab_size)
        mc = resolve_model_config(m.arch, m.preset, **dims)
    resumed = resumed_vocab_multiple(cfg) if requested is None else None
    multiple = run_vocab_multiple(requested, resumed, cfg.parallel.tp, mc.vocab_size)
    mc = dataclasses.replace(mc, vocab_multiple=multiple)
    if m.init_from:
        verify_hf_checkpoint(m.init_from, mc)
    if tok.vocab_size > mc.vocab_size:
        raise UserError(vocab_too_small(cfg, tok.vocab_size, mc.vocab_size))
    if cfg.data.seq_len > mc.max_seq_len:
        raise UserError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's {mc.max_seq_len} positions: lower "
            f"data.seq_len or raise model.max_seq_len"
        )
    needed, kind = NEEDED_TOKENS[family(mc.arch).objective]
    if any(getattr(tok, k) is None for k in needed):
        raise UserError(
            f"tokenizer {cfg.data.tokenizer} lacks the special tokens a {mc.arch} model needs: train one with {kind}"
        )
    return mc


def resumed_vocab_multiple(cfg: Config) -> int | None:
    """model.vocab_multiple of the checkpoint this run will resume (1 when saved before the key existed), or None for
    a fresh start: a resumed run keeps its vocabulary rows. Read before any process group exists; what is wrong with
    the checkpoint, if anything, is said where the run resumes it."""
    if cfg.checkpoint.resume == "never":
        return None
    try:
        if cfg.checkpoint.resume == "auto":
            path = latest_checkpoint(cfg.run_dir / "checkpoints")
        else:
            path = resolve_checkpoint_dir(cfg.checkpoint.resume)
        return None if path is None else int(read_state(path)["model_config"].get("vocab_multiple", 1))
    except (UserError, SharedError, OSError, ValueError, KeyError, TypeError):
        return None


def vocab_too_small(cfg: Config, tokens: int, rows: int) -> str:
    """What is true when the tokenizer has more ids than the model has tokens, and the fix that is open to the user:
    with model.init_from the vocabulary is the checkpoint's (its config.json), so the tokenizer must change."""
    m = cfg.model
    if not m.init_from:
        return (
            f"tokenizer {cfg.data.tokenizer} has {tokens} tokens but model.vocab_size is {rows}: raise "
            f"model.vocab_size to at least {tokens} or leave it unset"
        )
    said = (
        f"the checkpoint model.init_from={m.init_from} has {rows} token rows (vocab_size in its config.json) but "
        f"tokenizer {cfg.data.tokenizer} has {tokens} ids"
    )
    own = Path(m.init_from) / "tokenizer.json"
    if own.is_file() and own.resolve() == Path(cfg.data.tokenizer).resolve():
        return (
            f"{said}: the checkpoint's own tokenizer.json does not fit its weights; set data.tokenizer to the "
            f"tokenizer it was trained with (at most {rows} ids)"
        )
    if own.is_file() and load_tokenizer(own).vocab_size <= rows:
        return f"{said}: remove data.tokenizer to use the checkpoint's own tokenizer.json, or give one that fits"
    return f"{said}: set data.tokenizer to the tokenizer the checkpoint was trained with (at most {rows} ids)"


def engine_config(cfg: Config, model_cfg: ModelConfig, world: int | None = None) -> dict | None:
    """The generated DeepSpeed config (parallel.deepspeed checked against it), or None for the other engines; built
    from the world size (default: the launcher's WORLD_SIZE) before any process group exists, so a bad setting stops
    the run before it starts."""
    p = cfg.parallel
    if p.engine != "deepspeed":
        return None
    dp = (world or int(os.environ.get("WORLD_SIZE", "1"))) // p.tp
    return deepspeed_config(cfg.train, p, dp=dp, d_model=model_cfg.d_model)


def pipeline_plan(cfg: Config, model_cfg: ModelConfig, world: int | None = None) -> PipelinePlan | None:
    """The layer split and stage placement (parallel.pp > 1), refused in one line before any process group exists
    when it cannot run: an engine without pipeline stages, pp not dividing the world, more stages than layers, a
    split that does not cover the layers, a micro-batch count the schedule cannot run. `world`: the job's ranks
    (default: the launcher's WORLD_SIZE)."""
    p = cfg.parallel
    if p.pp == 1:
        if p.pp_split is not None or p.pp_virtual:
            raise UserError("parallel.pp_split and parallel.pp_virtual apply to pipelines: set parallel.pp >= 2")
        return None
    if p.engine == "deepspeed":
        raise UserError(
            "parallel.engine=deepspeed does not run under parallel.pp > 1 (DeepSpeed's pipeline engine needs its "
            "own PipelineModule model and schedule): use parallel.engine=fsdp, which shards each stage over dp"
        )
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_world(world, p.tp, p.pp)
    if p.engine == "ddp" and dp > 1:
        raise UserError(
            f"parallel.engine=ddp runs pipeline stages only with dp=1 (here {world} ranks / (pp={p.pp} x tp={p.tp}) "
            f"= dp {dp}): use parallel.engine=fsdp for pp x dp layouts"
        )
    with torch.device("meta"):
        shape_only = model_from_config(model_cfg)
    return plan_pipeline(
        p.pp,
        p.pp_schedule,
        p.pp_virtual,
        p.pp_split,
        model_cfg.n_layer,
        head_cost_in_blocks(shape_only, cfg.data.seq_len),
        cfg.train.grad_accum,
    )


def check_layout(cfg: Config, dims: ParallelDims, model_cfg: ModelConfig) -> None:
    """Parallel settings that need the world size or the model shape, refused before anything is built."""
    if cfg.parallel.engine == "ddp" and dims.tp > 1 and dims.replicas > 1:
        cp = f", cp={dims.cp}" if dims.cp > 1 else ""
        raise UserError(
            f"parallel.engine=ddp combines tensor parallelism only with dp=1{' and cp=1' if cp else ''} (here "
            f"dp={dims.dp}{cp}, tp={dims.tp}): use parallel.engine=fsdp for 2-D (dp x tp) layouts"
        )


def check_valid(cfg: Config, dims: ParallelDims, sources: list) -> None:
    """Reads this rank's first evaluation sample now, so that a valid set that cannot give one (no documents, a bad
    field) stops the run before it trains, not at its first evaluation."""
    stream = build_data_stream(cfg, dims, sources, training=False, micro_batch=1)
    try:
        next(iter(stream))
    finally:
        stream.close()


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


def build_model(
    cfg: Config,
    dims: ParallelDims,
    device: torch.device,
    model_cfg: ModelConfig,
    ds_config: dict | None = None,
    pretrained: bool = False,
    pipeline: PipelinePlan | None = None,
) -> tuple[Engine, dict]:
    """The engine around the model: built on the meta device (or partitioned as it is built, DeepSpeed ZeRO-3),
    parallelized, then sharded and materialised by the engine: no rank ever holds more than its shard (plus one whole
    parameter while initialising). `pretrained`: the weights of model.init_from replace the random ones."""
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
        load=partial(load_hf_weights, directory=cfg.model.init_from) if pretrained else None,
        pipeline=pipeline,
        micro_batches=t.grad_accum,
    )
    return engine, counts


def model_flops_per_token(model_cfg: ModelConfig, counts: dict, seq_len: int) -> float:
    """Training FLOPs per token: an untied LM head is a weight in the count already; a tied one is counted apart."""
    return flops_per_token(
        counts["n_params_non_embedding"],
        model_cfg.n_layer,
        model_cfg.d_model,
        seq_len,
        causal=family(model_cfg.arch).objective == "causal",
        vocab_size=model_cfg.padded_vocab_size if model_cfg.tied_head else 0,
        attention_dim=model_cfg.attention_dim,
    )


def build_run(
    cfg: Config,
    dims: ParallelDims,
    device: torch.device,
    tok: TokenizerInfo,
    model_cfg: ModelConfig,
    ds_config: dict | None = None,
    lock: RunLock | None = None,
    pipeline: PipelinePlan | None = None,
    predicted=None,
) -> Run:
    """Model, engine, checkpoint state and loggers; resumes from a checkpoint when there is one. `lock` (the run
    directory's) is taken before anything is written there. `predicted`: the memory formula's breakdown per rank
    (`trainer.plan.memory.Breakdown`), stated at start."""
    check_layout(cfg, dims, model_cfg)
    train_sources, valid_sources = data_sources(cfg)
    if valid_sources and cfg.train.eval_every:
        check_valid(cfg, dims, valid_sources)
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
    peak = PeakMeter(device, DTYPES[cfg.train.precision], dims.world_size)
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
        # a resume always prefers the run's own checkpoint to model.init_from
        pretrained = bool(cfg.model.init_from) and resume_from is None
        engine, counts = build_model(cfg, dims, device, model_cfg, ds_config, pretrained, pipeline)
        if resume_from is not None:
            rng = ckpt.load(resume_from, engine)
        wb = cfg.log.wandb
        logger = MetricsLogger(
            cfg.run_dir,
            is_main=dims.is_main,
            total_steps=cfg.train.steps,
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
            family=family(model_cfg.arch),
            model_cfg=model_cfg,
            engine=engine,
            ckpt=ckpt,
            logger=logger,
            state=state,
            rng=rng,
            train_sources=train_sources,
            valid_sources=valid_sources,
            flops_per_token=model_flops_per_token(model_cfg, counts, cfg.data.seq_len),
            peak=peak,
            stream=stream,
        )
        announce(run, counts, resume_from, predicted)
        return run
    except BaseException:
        stream.close()  # the workers must not outlive a failed start
        raise


def announce(run: Run, counts: dict, resume_from, predicted=None) -> None:
    """The `start` record of metrics.jsonl and the start lines: what was built, on what layout, from where."""
    cfg, dims, t, logger, state = run.cfg, run.dims, run.cfg.train, run.logger, run.state
    layout = run.engine.layout()
    logger.start(
        {
            **counts,
            "world_size": dims.world_size,
            "dp": dims.dp,
            "tp": dims.tp,
            "pp": dims.pp,
            "cp": dims.cp,
            **layout,
            "global_batch": run.global_batch,
            "global_batch_tokens": run.global_batch * cfg.data.seq_len,
            "flops_per_token": run.flops_per_token,
            "resumed_from_step": state.step if resume_from else None,
            "resumed_from": str(resume_from) if resume_from else None,
            "arch": run.model_cfg.arch,
            "vocab_size": run.model_cfg.vocab_size,  # the tokens (tokenizer's or checkpoint's)
            "padded_vocab_size": run.model_cfg.padded_vocab_size,  # embedding and head rows (model.vocab_multiple)
            "preset": cfg.model.preset,
            "device": str(run.device),
            "precision": t.precision,
            "peak_flops": run.peak.peak,
            "peak_flops_source": run.peak.source,
            "data_sources": {src.name: src.weight for src in run.train_sources},
            "data_shuffle": cfg.data.shuffle,
            "data_streams": cfg.data.streams,
            "predicted_peak_bytes": predicted.peak if predicted else None,
            "predicted_peak_at": predicted.peak_at if predicted else None,
            "predicted_bytes": {k: getattr(predicted, k) for k in PREDICTED} if predicted else None,
        }
    )
    name = run.family.title + (f" {cfg.model.preset}" if cfg.model.preset else "")
    vocab, rows = run.model_cfg.vocab_size, run.model_cfg.padded_vocab_size
    padded = f" (vocabulary {vocab:,} padded to {rows:,} rows)" if rows != vocab else ""
    zero = f" ZeRO-{layout['zero_stage']}" if layout["zero_stage"] else ""
    offloaded = f" (+{layout['offload_bytes'] / 2**20:,.1f} MiB in CPU memory)" if layout.get("offload_bytes") else ""
    tokens = run.global_batch * cfg.data.seq_len
    peak = f", predicted peak {predicted.peak / 2**20:,.1f} MiB" if predicted else ""
    grid = f"dp {dims.dp} x tp {dims.tp}" if dims.cp == 1 else f"dp {dims.dp} x cp {dims.cp} x tp {dims.tp}"
    state_mib = f"{layout['model_state_bytes'] / 2**20:,.1f}"
    if dims.pp > 1:
        split = " ".join(f"[{s[0]}-{s[-1]}]" if len(s) > 1 else f"[{s[0]}]" for s in layout["pp_split"])
        grid = f"pp {dims.pp} x {grid}, {layout['pp_schedule']} over stages of layers {split}"
        per_pp_rank = layout["pp_rank_model_state_bytes"]
        state_mib = "/".join(f"{b / 2**20:,.1f}" for b in per_pp_rank) + " (pp ranks in order)"
    logger.print(
        f"{name}: {counts['n_params']:,} parameters{padded} | {layout['engine']}{zero}, {grid} on "
        f"{run.device.type}, offload {layout['offload']}, model state {state_mib} MiB per rank{offloaded}{peak} | "
        f"{run.global_batch} x {cfg.data.seq_len} = {tokens:,} tokens "
        f"per step | {t.steps:,} steps, {t.precision} | run dir {cfg.run_dir}"
    )
    logger.print(describe_data(cfg, run.train_sources, dims.dp))
    if resume_from:
        logger.print(f"resumed from {resume_from} at step {state.step}")
    elif cfg.model.init_from:
        logger.print(f"weights from {cfg.model.init_from} (Hugging Face checkpoint)")
    if state.step >= t.steps:
        logger.print(f"the run is complete at step {state.step}: raise train.steps to train further")
