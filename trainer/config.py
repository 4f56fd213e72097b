"""The run config: typed sections loaded from YAML and overridden from the command line as `section.key=value`.

Every field below is a public config key (see docs in design.md). Unknown keys and wrong types are user errors that
name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import keyword
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import UserError
from trainer.models.registry import ARCHS, arch_of_checkpoint, check_settings
from trainer.profiling import check_profile


@dataclass
class RunConfig:
    name: str = "run"  # the run's name (W&B run name, default directory)
    dir: str | None = None  # where config, metrics and checkpoints go; defaults to runs/<name>
    seed: int = 1234  # seeds weights, dropout and the MLM masks


@dataclass
class ModelSection:
    # the model family: gpt | bert | llama (trainer/models/registry.py); unset: the family of init_from's config.json
    # (its `architectures`), else gpt
    arch: str | None = None
    preset: str | None = None  # gpt2-small, ..., bert-base, ..., smollm2-135m, llama3.2-1b, qwen3-0.6b, tiny ones
    init_from: str | None = None  # a Hugging Face checkpoint directory to start from; its config.json sets the dims
    # Every other model.* key is a dimension of the family (n_layer, n_head, d_model, d_ff, vocab_size, max_seq_len,
    # dropout, and the family's own, e.g. llama's n_kv_heads): it overrides the preset, and the family checks it.
    # vocab_size defaults to the tokenizer's vocabulary size. vocab_multiple (default 128; a resumed run keeps its
    # checkpoint's): the embedding and head get rows up to a multiple of it (and of parallel.tp); those rows are no
    # token and never win a softmax (not projected; masked under tp); export trims them.
    dims: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    # files, globs or directories (one source); or named sources with weights, e.g.
    # {code: {path: [code/*.jsonl], weight: 0.3}, prose: {path: [books/*.txt], weight: 0.7}} (a source may also set
    # format and text_field, or name a dataset: {dataset: NAME, split: train} for datasets.load_dataset)
    train: list[str] | dict = field(default_factory=list)
    valid: list[str] = field(default_factory=list)  # evaluation corpus, never shuffled; no evaluation when empty
    valid_fraction: float = 0.0  # instead of `valid`: hold out this fraction of the (single) train source's documents
    # auto | text | jsonl | parquet | tokens (a directory from `trainer prepare`) | saved (datasets' save_to_disk)
    format: str = "auto"
    text_field: str = "text"  # the field holding the text in jsonl/parquet rows
    tokenizer: str | None = None  # path to tokenizer.json (from `trainer tokenizer`)
    seq_len: int = 128  # tokens per training sample
    shuffle: bool = True  # shuffle the training order (prepared: a permutation per epoch; raw: units and blocks)
    streams: int = 64  # L logical streams per raw source; a data-parallel size dividing L reads only its share
    shuffle_block: int = 128  # raw sources: samples of a stream shuffled together
    num_workers: int = 1  # DataLoader worker processes per rank that tokenize (0 = in the training process)
    bad_lines: str = "skip"  # skip | error: what to do with corpus lines that are not valid JSON


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in the whole run
    micro_batch: int = 8  # samples per rank per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = micro_batch * grad_accum * dp
    lr: float = 3e-4  # peak learning rate, reached after warmup_steps
    min_lr: float = 3e-5  # cosine decay ends here at `steps`
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.1  # AdamW decay on matrices only (not norms, biases, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds dynamic loss scaling)
    activation_checkpointing: str = "none"  # none | full (blocks; head + loss in chunks) | selective (every other)
    compile: bool = False  # torch.compile the model
    eval_every: int = 100  # steps between evaluations (and at the last step); 0 disables
    eval_steps: int = 10  # validation batches (global batch size, so any layout sees the same samples) per evaluation
    max_bad_steps: int = 5  # consecutive non-finite (skipped) steps that stop the run; checked when it logs
    sample_tokens: int = 48  # GPT: tokens generated as a sample at each evaluation; 0 disables


@dataclass
class ParallelConfig:
    engine: str = "ddp"  # ddp | fsdp (FSDP2) | deepspeed
    # ddp: 0; fsdp: 2 (params kept from forward to backward) or 3 (default, resharded); deepspeed: 1, 2 (default) or 3
    zero_stage: int | None = None
    tp: int = 1  # tensor-parallel degree (Megatron-style, with sequence parallelism); world size = pp * dp * tp
    pp: int = 1  # pipeline-parallel degree: the layers split into stages on pp ranks (micro-batches = grad_accum)
    cp: int = 1  # context-parallel degree: each sequence split over cp ranks (gpt, llama); world = pp * dp * cp * tp
    pp_schedule: str = "1f1b"  # 1f1b | gpipe | interleaved-1f1b | looped-bfs | zero-bubble | zbv | dualpipev
    pp_virtual: int = 0  # stages per rank (interleaved and V schedules); 0: 1, or 2 for those schedules
    pp_split: list[int] | None = None  # layers per stage, in stage order (pp * pp_virtual counts); default: balanced
    offload: str = "none"  # none | cpu: optimizer state (and at ZeRO-3 parameters) in CPU memory; deepspeed only
    deepspeed: dict | None = None  # extra DeepSpeed config settings, merged into the generated one (no contradictions)
    timeout_s: float = 600.0  # collective timeout: a rank stuck this long fails the job, naming the rank


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (also written at the end and on SIGTERM/SIGUSR1); 0 = only those
    keep: int = 3  # newest complete checkpoints kept
    resume: str = "auto"  # auto (latest in run dir, if any) | never | PATH to a checkpoint directory
    # YAML key `async`: write in the background; the step is blocked only while the state is copied to host memory
    # (one full copy of the rank's state, kept for the run). DeepSpeed saves synchronously.
    async_: bool = False


@dataclass
class WandbConfig:
    mode: str = "online"  # online | offline | disabled; online falls back to offline without an API key
    project: str = "trainer"
    entity: str | None = None


@dataclass
class LogConfig:
    every: int = 10  # steps between metric lines
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ProfileConfig:
    # [A, B]: a torch.profiler trace of training steps A to B (from 1, both included) per rank, written to
    # RUN_DIR/profile/rank<R>_step<A>-<B>.json (open it in https://ui.perfetto.dev or chrome://tracing)
    steps: list[int] | None = None
    # CUDA only: the allocator's history from start-up, written after step B (after step 1 without profile.steps)
    # and when a rank runs out of memory, to RUN_DIR/profile/rank<R>_memory_*.pickle (https://pytorch.org/memory_viz)
    memory_snapshot: bool = False


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    def to_dict(self) -> dict:
        """Plain dict, as written to config.yaml: the model's dims sit beside arch and preset, as the user wrote them."""
        out = _as_dict(self)
        out["model"].update(out["model"].pop("dims"))
        return out


def yaml_key(name: str) -> str:
    """The config key of a field: one named after a Python keyword carries a trailing underscore (`async_` is the
    key `async`)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def field_name(key: str) -> str:
    """The dataclass field of a config key (`async` -> `async_`)."""
    return f"{key}_" if keyword.iskeyword(key) else key


def _as_dict(obj: Any) -> Any:
    """dataclasses.asdict with config keys for field names (only fields are renamed, never a mapping's keys)."""
    if dataclasses.is_dataclass(obj):
        return {yaml_key(f.name): _as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return copy.deepcopy(obj)


CHOICES = {
    "model.arch": ARCHS,
    "data.format": ("auto", "text", "jsonl", "parquet", "tokens", "saved"),
    "data.bad_lines": ("skip", "error"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "parallel.engine": ("ddp", "fsdp", "deepspeed"),
    "parallel.offload": ("none", "cpu"),
    "parallel.pp_schedule": ("1f1b", "gpipe", "interleaved-1f1b", "looped-bfs", "zero-bubble", "zbv", "dualpipev"),
    "log.wandb.mode": ("online", "offline", "disabled"),
}
POSITIVE = (
    "train.steps",
    "train.micro_batch",
    "train.grad_accum",
    "data.seq_len",
    "data.streams",
    "data.shuffle_block",
    "log.every",
    "checkpoint.keep",
    "parallel.tp",
    "parallel.pp",
    "parallel.cp",
)
NON_NEGATIVE = (
    "train.warmup_steps",
    "train.eval_every",
    "train.eval_steps",
    "train.grad_clip",
    "train.lr",
    "train.min_lr",
    "train.weight_decay",
    "checkpoint.every",
    "data.num_workers",
    "train.sample_tokens",
    "train.max_bad_steps",
    "parallel.pp_virtual",
)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return "a list of integers" if typing.get_args(tp) == (int,) else "a list of strings"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the field type `tp`; ints are accepted for floats, a single string for a list."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                pass
    elif origin is list and typing.get_args(tp) == (int,):
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
    elif origin is list:
        if isinstance(value, (str, Path)):
            return [str(value)]
        if isinstance(value, list) and all(isinstance(v, (str, Path)) for v in value):
            return [str(v) for v in value]
    elif (
        tp is dict
        and isinstance(value, dict)
        or tp is bool
        and isinstance(value, bool)
        or tp is int
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"config key {key} expects {_type_name(tp)}, got {value!r}: fix it in the YAML or the override")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config section {prefix or 'root'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [yaml_key(f.name) for f in dataclasses.fields(cls)]
    kwargs = {}
    if cls is ModelSection:  # every key but arch, preset and init_from is a family dimension, checked in validate()
        own = ("arch", "preset", "init_from")
        raw = {**{k: v for k, v in raw.items() if k in own}, "dims": {k: v for k, v in raw.items() if k not in own}}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known keys: {', '.join(names)})"
            raise UserError(f"unknown config key {full}{hint}")
        tp = hints[field_name(key)]
        if dataclasses.is_dataclass(tp):
            kwargs[field_name(key)] = _build(tp, value, f"{full}.")
        else:
            kwargs[field_name(key)] = _coerce(value, tp, full)
    return cls(**kwargs)


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, field_name(part))
    return obj


def validate(cfg: Config) -> None:
    """Value checks that do not need the model or the data (those come at build time)."""
    if cfg.model.arch is None:  # the checkpoint's config.json names its family
        cfg.model.arch = arch_of_checkpoint(cfg.model.init_from) if cfg.model.init_from else "gpt"
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise UserError(f"config key {key}={value!r} is not one of {', '.join(choices)}")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise UserError(f"config key {key} must be positive, got {_get(cfg, key)}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise UserError(f"config key {key} must not be negative, got {_get(cfg, key)}")
    check_settings(cfg.model.arch, list(cfg.model.dims))
    check_profile(cfg.profile, cfg.train.steps)
    validate_parallel(cfg.parallel)
    if cfg.train.min_lr > cfg.train.lr:
        raise UserError(f"train.min_lr={cfg.train.min_lr} is above train.lr={cfg.train.lr}; lower min_lr")
    if not cfg.data.train:
        raise UserError("data.train is empty: give the training corpus, e.g. data.train=[corpus/*.jsonl]")
    if not 0.0 <= cfg.data.valid_fraction < 1.0:
        raise UserError(f"data.valid_fraction={cfg.data.valid_fraction} must be in [0, 1), e.g. 0.01")
    if cfg.data.valid_fraction and cfg.data.valid:
        raise UserError("set either data.valid (a separate corpus) or data.valid_fraction (held out of data.train)")
    if not cfg.data.tokenizer and cfg.model.init_from:  # the checkpoint's own tokenizer
        own = Path(cfg.model.init_from) / "tokenizer.json"
        if not own.is_file():
            raise UserError(
                f"data.tokenizer is not set and model.init_from={cfg.model.init_from} has no tokenizer.json: set "
                f"data.tokenizer"
            )
        cfg.data.tokenizer = str(own)
    if not cfg.data.tokenizer:
        raise UserError(
            "data.tokenizer is not set: train one with `trainer tokenizer` and set data.tokenizer=DIR/tokenizer.json"
        )


def validate_parallel(p: ParallelConfig) -> None:
    """Engine / ZeRO stage / offload combinations; fills in the engine's default ZeRO stage."""
    if p.zero_stage is None:
        p.zero_stage = {"ddp": 0, "fsdp": 3, "deepspeed": 2}[p.engine]
    if p.timeout_s <= 0:
        raise UserError(f"parallel.timeout_s must be positive, got {p.timeout_s}")
    if p.deepspeed is not None and p.engine != "deepspeed":
        raise UserError(
            f"parallel.deepspeed settings are for parallel.engine=deepspeed (here {p.engine}): remove them or set "
            f"parallel.engine=deepspeed"
        )
    if p.engine == "deepspeed":
        if p.zero_stage == 0 and p.offload != "none":
            raise UserError(
                f"parallel.offload={p.offload} needs a ZeRO stage (it moves the sharded optimizer state): set "
                f"parallel.zero_stage=1, 2 or 3, or parallel.offload=none"
            )
        if p.zero_stage not in (1, 2, 3):
            raise UserError(
                f"parallel.engine=deepspeed runs parallel.zero_stage=1, 2 or 3, not {p.zero_stage}: for ZeRO stage 0 "
                f"(no sharding) use parallel.engine=ddp"
            )
        if p.tp != 1:
            raise UserError(
                f"parallel.engine=deepspeed does not combine with tensor parallelism (parallel.tp={p.tp}): use "
                f"parallel.engine=fsdp for tp > 1, or parallel.tp=1"
            )
        return
    if p.engine == "ddp" and p.zero_stage != 0:
        raise UserError(
            f"parallel.zero_stage={p.zero_stage} needs a sharding engine (ddp is ZeRO stage 0): set "
            f"parallel.engine=fsdp parallel.zero_stage=2 or 3, or parallel.zero_stage=0"
        )
    if p.engine == "fsdp" and p.zero_stage not in (2, 3):
        hint = (
            "FSDP2 has no ZeRO-1 (optimizer-only sharding): use parallel.zero_stage=2, which also shards gradients"
            if p.zero_stage == 1
            else "use parallel.zero_stage=2 or 3 (ZeRO stage 0 is parallel.engine=ddp)"
        )
        raise UserError(f"parallel.engine=fsdp does not run parallel.zero_stage={p.zero_stage}: {hint}")
    if p.offload != "none":
        raise UserError(
            f"parallel.offload={p.offload} is not offered by parallel.engine={p.engine}: set parallel.offload=none "
            f"(CPU offload of optimizer state comes with parallel.engine=deepspeed)"
        )


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), _fix_floats(parsed)


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "infinity", "+inf")


def _fix_floats(node: Any) -> Any:
    """YAML 1.1 (PyYAML) reads 3e-4 as a string; such strings become floats, in files and overrides alike."""
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node) and any(c in node for c in "eE."):
        return float(node)
    return node


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads a YAML config (or none: all defaults), applies `section.key=value` overrides, validates."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist: check the path")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {p} must hold a mapping of sections (run, model, data, train, ...)")
        raw = _fix_floats(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
