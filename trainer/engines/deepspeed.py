"""The `deepspeed` engine: DeepSpeed ZeRO stage 1, 2 or 3, optionally with optimizer state (and at stage 3 the
parameters) offloaded to CPU, behind the same interface as ddp and fsdp.

The DeepSpeed config is generated from ours (`deepspeed_config`); `parallel.deepspeed` may add settings we do not
generate, and one that contradicts a generated value is refused. Numerics follow the engine contract:
- DeepSpeed divides the loss by its accumulation steps and averages gradients over data-parallel ranks; `backward`
  passes `scale_wrt_gas=False` and multiplies the loss by dp, so gradients come out as the plain sum over ranks.
- Accumulation boundaries are ours: `micro_batch(last)` sets DeepSpeed's boundary, `step` calls its step once.
- Clipping, the fp16 loss scaler (GPU only: DeepSpeed's CPU accelerator has no fp16) and the overflow skip are
  DeepSpeed's, configured like the other engines' (scale 2^16, halved on every overflow, doubled after 2000 good
  steps). A step is skipped when the global gradient norm is not finite, which any non-finite loss makes it.
- At stage 3 the model is built inside `deepspeed.zero.Init`, so every parameter is partitioned as its module is
  constructed; the weights are then drawn one parameter at a time (gathered, initialised, partitioned again) from
  the seeded RNG, which gives the same weights as every other layout.
Checkpoints are DeepSpeed's own (`save_checkpoint` on every rank into `<step dir>/deepspeed/`). One written by
another world size, ZeRO-1/2 stage or offload setting is converted once to DeepSpeed's universal checkpoint and
loaded from that; `consolidate` turns any of them into a plain fp32 state dict with DeepSpeed's `zero_to_fp32`.

Two DeepSpeed 0.19 behaviours are worked around here: `zero.Init` ignores an explicit dtype on a CPU accelerator
(operator precedence in `_set_dtype`), so the dtype comes from the config; and ZeRO-3's universal-checkpoint loader
gives all parameter groups one shared `step` tensor and the first group's hyper-parameters (weight decay included).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from trainer.config import ParallelConfig, TrainConfig
from trainer.engines.base import DTYPES, MicroBatchSteps, fsync, unique_params
from trainer.errors import UserError
from trainer.optim import OptimizerSettings, param_groups
from trainer.parallel import ParallelDims, barrier, materialize, unwrapped

PAYLOAD_DIR = "deepspeed"  # inside a checkpoint directory
TAG = "state"  # DeepSpeed's checkpoint tag: its files sit in deepspeed/state/
UNIVERSAL_TAG = "universal"  # the same state converted to DeepSpeed's universal format, for another layout
LAYOUT_FILE = "layout.json"  # world size, ZeRO stage and offload of the run that wrote the checkpoint


def import_deepspeed():
    """deepspeed, or one line saying how to install it (it is an optional extra)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than have DeepSpeed warn that it guessed
    try:
        import deepspeed
    except ImportError:
        raise UserError(
            "parallel.engine=deepspeed needs DeepSpeed: pip install 'trainer[deepspeed]' (or pip install deepspeed)"
        ) from None
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)  # its INFO and advice lines would flood the console
    _cache_cpu_info()
    # DeepSpeed calls collectives torch has renamed; torch warns on every call, which is not the user's to fix
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    return deepspeed


def _cache_cpu_info() -> None:
    """DeepSpeed's op loader asks py-cpuinfo for the CPU three times when it loads CPUAdam (offload), and each
    `get_cpu_info()` starts a Python subprocess: about 3.4 s per rank at every offloaded start. The answer cannot
    change within a process, so it is asked once."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then reads lscpu instead
        return
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


# --- the DeepSpeed config, generated from ours ------------------------------------------------------------------


def deepspeed_config(t: TrainConfig, p: ParallelConfig, dp: int, d_model: int) -> dict:
    """The config handed to `deepspeed.initialize`, generated from `train.*` and `parallel.*`, then the extra
    settings of `parallel.deepspeed` merged in. An extra setting that contradicts a generated one is a UserError
    naming both; the optimizer and scheduler are ours under every engine.

    Communication buckets default to the model's width, as Hugging Face's DeepSpeed integration sizes them ("auto"),
    rather than DeepSpeed's fixed 5e8 / 5e7 elements, which hold hundreds of MB of buffers per rank whatever the
    model; `parallel.deepspeed` may set them."""
    zero_stage, offload, precision, extra = p.zero_stage, p.offload, t.precision, p.deepspeed
    micro_batch, grad_accum, grad_clip = t.micro_batch, t.grad_accum, t.grad_clip
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError(
            "train.precision=fp16 under parallel.engine=deepspeed needs a GPU (DeepSpeed's CPU accelerator has no "
            "fp16): use train.precision=bf16 or fp32, or parallel.engine=fsdp for fp16"
        )
    owned = {  # path -> (value, the setting of ours it comes from)
        "train_micro_batch_size_per_gpu": (micro_batch, "train.micro_batch"),
        "gradient_accumulation_steps": (grad_accum, "train.grad_accum"),
        "train_batch_size": (micro_batch * grad_accum * dp, "train.micro_batch x train.grad_accum x dp"),
        "gradient_clipping": (grad_clip, "train.grad_clip"),
        "zero_optimization.stage": (zero_stage, "parallel.zero_stage"),
        "fp16.enabled": (precision == "fp16", "train.precision"),
        "bf16.enabled": (precision == "bf16", "train.precision"),
    }
    if offload == "cpu":
        owned["zero_optimization.offload_optimizer.device"] = ("cpu", "parallel.offload")
        if zero_stage == 3:
            owned["zero_optimization.offload_param.device"] = ("cpu", "parallel.offload")
    if precision == "fp16":  # the other engines' dynamic loss scaling
        scaler = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000, "hysteresis": 1}
        source = "train.precision=fp16 (the loss scaler every engine uses)"
        owned.update({f"fp16.{k}": (v, source) for k, v in scaler.items()})
    if precision != "fp32":  # gradients accumulate and are reduced in fp32, as under fsdp
        owned["data_types.grad_accum_dtype"] = ("fp32", f"train.precision={precision} (fp32 gradient accumulation)")
    config: dict = {  # defaults: `extra` may change them
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_optimization": {"reduce_bucket_size": d_model * d_model},
    }
    if zero_stage == 3:
        config["zero_optimization"].update(
            stage3_prefetch_bucket_size=int(0.9 * d_model * d_model), stage3_param_persistence_threshold=10 * d_model
        )
    for path, (value, _) in owned.items():
        _set_path(config, path, value)
    if not extra:
        return config
    for key in ("optimizer", "scheduler"):
        if key in extra:
            raise UserError(
                f"parallel.deepspeed.{key} is not taken: the optimizer (AdamW) and the LR schedule (warmup + cosine) "
                f"come from train.* under every engine; remove it and set train.lr, train.warmup_steps, ..."
            )
    for path, value in _leaves(extra):
        for owned_path, (ours, source) in owned.items():
            if path == owned_path or owned_path.startswith(path + ".") or path.startswith(owned_path + "."):
                mine = _get_path(config, path)
                if path != owned_path or value != ours:
                    raise UserError(
                        f"parallel.deepspeed.{path}={value!r} contradicts {source} (the generated DeepSpeed config has "
                        f"{path}={mine!r}): set it through {source.split(' ')[0]}, or remove it from parallel.deepspeed"
                    )
    for path, value in _leaves(extra):
        _set_path(config, path, value)
    return config


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _set_path(d: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for p in parents:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[last] = value


def _get_path(d: dict, path: str):
    for p in path.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


# --- the first use of DeepSpeed's C++ ops builds them -----------------------------------------------------------


def announce_op_builds(offload: str) -> None:
    """DeepSpeed compiles its C++ ops on first use on a machine (2-3 minutes on 2 cores); say so while it happens.
    They are cached under torch's extension directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    names = ["ShareMemCommBuilder"] if get_accelerator().device_name() == "cpu" else []
    if offload == "cpu":
        names.append("CPUAdamBuilder")
    missing = []
    for builder_name in names:
        builder = get_accelerator().create_op_builder(builder_name)
        if builder is None:  # an accelerator without this op: nothing to build
            continue
        build_dir = Path(_get_build_directory(builder.name, verbose=False))
        if not any(build_dir.glob(f"{builder.name}*.so")):
            missing.append(builder.name)
    if missing and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
        print(
            f"DeepSpeed: compiling its C++ op(s) {', '.join(missing)} (first use on this machine: 2-3 minutes on 2 "
            f"cores; cached in {where} for later runs)",
            flush=True,
        )


# --- building the model -----------------------------------------------------------------------------------------


class _GatheredInit(TorchFunctionMode):
    """Initialises ZeRO-3 partitioned parameters as a whole model would be: each parameter an init function touches
    is gathered, initialised in full from the global RNG (every rank draws the same values), and partitioned again
    (rank 0's values broadcast). One parameter is whole at a time."""

    def __init__(self, gathered_parameters) -> None:
        super().__init__()
        self.gathered = gathered_parameters

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        in_place = getattr(func, "__name__", "").endswith("_")  # normal_, zeros_, ones_, ...
        if in_place and isinstance(target, nn.Parameter) and hasattr(target, "ds_id"):
            with self.gathered([target], modifier_rank=0):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _numel(p: nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())


class DeepSpeedEngine(MicroBatchSteps):
    name = "deepspeed"

    def __init__(
        self,
        make_model,
        prepare,
        *,
        config: dict,
        dims: ParallelDims,
        device: torch.device,
        precision: str,
        optim: OptimizerSettings,
        seed: int,
        zero_stage: int,
        offload: str,
        load=None,
    ) -> None:
        """`config` comes from `deepspeed_config`, which generated and checked it before the process group existed."""
        deepspeed = import_deepspeed()
        self.dims, self.device, self.zero_stage, self.offload = dims, device, zero_stage, offload
        self.dtype = DTYPES[precision]
        self.config = config
        announce_op_builds(offload)
        os.environ.setdefault("LOCAL_RANK", "0")  # a single process started without a launcher
        with contextlib.redirect_stdout(io.StringIO()):  # "op built successfully", on every rank, at every start
            backend = "nccl" if device.type == "cuda" else "gloo"  # the group exists: this only names it
            deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
        if zero_stage == 3:  # partitioned as it is built: no rank ever holds the whole model
            # dtype comes from the config (fp32, bf16 or fp16); DeepSpeed ignores an explicit dtype on a CPU accelerator
            with deepspeed.zero.Init(config_dict_or_path=self.config):
                model = make_model()
            model = prepare(model)  # outside: zero.Init would also hook the checkpoint wrappers' construction
            torch.manual_seed(seed)
            with torch.no_grad(), _GatheredInit(deepspeed.zero.GatheredParameters):
                model.init_weights()
            if load is not None:
                load(model)
        else:  # ZeRO-1/2 keep the whole model on every rank
            with torch.device("meta"):
                model = prepare(make_model())
            materialize(model, device, seed, load)
        groups = param_groups(model, optim.weight_decay, shape=lambda p: getattr(p, "ds_shape", p.shape))
        if offload == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
        self.n_params = sum(_numel(p) for p in unique_params(model))
        self.hyperparameters = [{k: g[k] for k in ("weight_decay", "betas", "eps")} for g in optimizer.param_groups]
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.module = model

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    @contextlib.contextmanager
    def micro_batch(self, last: bool):
        """Our micro-batches are DeepSpeed's: gradients are reduced (and the step taken) at the last one."""
        self.ds.set_gradient_accumulation_boundary(last)
        yield

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.ds(input_ids, labels=labels)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages over dp ranks (and, unless told not to, divides by its accumulation steps): x dp undoes
        # the average, exactly for a power-of-two dp.
        self.ds.backward(loss * self.dims.dp, scale_wrt_gas=False)

    def step(self, lr: float, loss_finite: torch.Tensor | bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSpeed's step (unscale, clip, update or skip); the skip is its overflow check's to decide, since a
        non-finite loss makes the gradient norm non-finite. DeepSpeed reads its norm and overflow flag on the host."""
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        norm = self.ds.get_global_grad_norm()  # before clipping; inf when DeepSpeed found an overflow
        norm = float("inf") if norm is None else float(norm)
        return torch.tensor(norm), torch.tensor(bool(self.ds.was_step_applied()))

    def save(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint, every rank writing its partitions (each rank fsyncs the files it wrote), and
        the layout that wrote it, which `load` compares with its own."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        target = directory / PAYLOAD_DIR
        # no tensor-parallel slices to describe: the version is all DeepSpeed's universal conversion needs
        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.ds.save_checkpoint(str(target), tag=TAG, client_state=info, save_latest=False)
        rank = torch.distributed.get_rank()
        written = [f for f in (target / TAG).iterdir() if f.is_file()]
        if rank == 0:
            (target / LAYOUT_FILE).write_text(json.dumps(self._saved_layout()))
            written.append(target / LAYOUT_FILE)
        for f in written:
            if (f"_rank_{rank}_" in f.name) if "zero_pp_rank_" in f.name else rank == 0:
                fsync(f)

    def _saved_layout(self) -> dict:
        return {"world_size": self.dims.world_size, "zero_stage": self.zero_stage, "offload": self.offload}

    def load(self, directory: Path) -> None:
        """Loads a checkpoint written by the same layout directly; one written by another world size, ZeRO stage or
        offload setting goes through DeepSpeed's universal checkpoint: rank 0 converts it once (kept beside the
        original as `deepspeed/universal/`), then every rank loads its new partitions from it."""
        target = directory / PAYLOAD_DIR  # that it is there was checked before the engine was built
        saved = json.loads((target / LAYOUT_FILE).read_text())
        tag = TAG
        if saved != self._saved_layout():
            if self.dims.is_main and not (target / UNIVERSAL_TAG).is_dir():
                to_universal(target)
            barrier()
            tag = UNIVERSAL_TAG
            self.ds._config.load_universal_checkpoint = True  # "checkpoint.load_universal"; read only by loading
        try:
            path, _ = self.ds.load_checkpoint(
                str(target), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise UserError(f"DeepSpeed found no checkpoint in {target / tag}: start a fresh run")
        # The config, not the checkpoint, sets the hyper-parameters (as under the other engines); DeepSpeed's ZeRO-3
        # universal loading would also give every group the first group's, weight decay included.
        for group, ours in zip(self.ds.optimizer.param_groups, self.hyperparameters, strict=True):
            group.update(ours)
        # ZeRO-3 universal loading gives every parameter group the same `step` tensor, which AdamW then advances
        # once per group per step: each group needs its own.
        for state in self.ds.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def layout(self) -> dict:
        """Theoretical model-state bytes of this rank (the ZeRO paper's accounting): parameters and gradients in the
        compute dtype (P bytes each), fp32 master weights and two AdamW moments (12 bytes) partitioned over dp.
        Stage 1 partitions the optimizer state, 2 also gradients, 3 also parameters; offload moves the optimizer
        state (and at stage 3 the parameters) to CPU memory, reported as `offload_bytes`."""
        n, dp = self.n_params, self.dims.dp
        p = 4 if self.dtype == torch.float32 else 2
        params = p * n / dp if self.zero_stage == 3 else p * n
        grads = p * n / dp if self.zero_stage >= 2 else p * n
        optim = 12 * n / dp
        device, host = params + grads + optim, 0.0
        if self.offload == "cpu":
            device, host = device - optim, host + optim
            if self.zero_stage == 3:
                device, host = device - params, host + params
        return {
            "engine": self.name,
            "zero_stage": self.zero_stage,
            "offload": self.offload,
            "model_state_bytes": int(device),
            "offload_bytes": int(host),
        }


def consolidate(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed checkpoint of any ZeRO stage and world size, gathered on this CPU process by
    DeepSpeed's own `zero_to_fp32`, keyed by our parameter names."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress report
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir / PAYLOAD_DIR), tag=TAG)
    return {unwrapped(name): tensor for name, tensor in state.items()}


def to_universal(payload: Path) -> None:
    """DeepSpeed's `ds_to_universal` conversion of `payload/state` into `payload/universal` (written aside, then
    renamed into place, so an interrupted conversion is redone rather than half used)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = payload / f".tmp_{UNIVERSAL_TAG}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(payload / TAG),
        output_folder=str(tmp),
        num_extract_workers=max(1, min(8, (os.cpu_count() or 2) // 2)),
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its progress report is not for our console
        ds_to_universal(args)
    os.replace(tmp, payload / UNIVERSAL_TAG)
