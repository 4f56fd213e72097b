"""`trainer plan`: the config's layout broken down per rank, the layouts that fit ranked by estimated step time, and the
command that runs the best one; `--json` gives the same as one object."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

from trainer.config import Config
from trainer.errors import UserError
from trainer.models import ModelConfig, resolve_model_config
from trainer.plan.cost import DEFAULT_EFFICIENCY, model_flops
from trainer.plan.hardware import GB, Accelerator, GiB
from trainer.plan.memory import Layout, n_params
from trainer.plan.search import CATEGORY_NAMES, Candidate, evaluate, search, usable

SHOWN = 10  # ranked layouts printed (--json has them all)


def plan_model(cfg: Config) -> tuple[ModelConfig, str]:
    """The model's shape as `trainer train` resolves it; the vocabulary comes from the tokenizer when its file is
    there, else from model.vocab_size or the preset (said in the second value)."""
    from trainer.build import resolve_model

    tok_path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    if tok_path is not None and tok_path.exists():
        from trainer.tokenizer import load_tokenizer

        return resolve_model(cfg, load_tokenizer(tok_path)), f"vocabulary from {tok_path}"
    m = cfg.model
    dims = {k: v for k, v in m.dims.items() if v is not None}
    if m.init_from:
        stand_in = SimpleNamespace(vocab_size=0, eos_id=0, cls_id=0, sep_id=0, mask_id=0)
        return resolve_model(cfg, stand_in), f"shape from {m.init_from}"
    shape = resolve_model_config(m.arch, m.preset, **dims)
    stand_in = SimpleNamespace(vocab_size=shape.vocab_size, eos_id=0, cls_id=0, sep_id=0, mask_id=0)
    return resolve_model(cfg, stand_in), "vocabulary from the model settings (no tokenizer file found)"


def launch_command(config: str, overrides: list[str], layout: Layout, acc: Accelerator) -> str:
    """`launch local` on one node, `launch slurm` over several."""
    extra = " ".join(overrides + layout.overrides())
    gpus = layout.world
    if gpus <= acc.gpus_per_node:
        return f"launch local --nproc-per-node {gpus} -- {config} {extra}".rstrip()
    nodes = math.ceil(gpus / acc.gpus_per_node)
    return f"launch slurm --nodes {nodes} --gpus-per-node {acc.gpus_per_node} -- {config} {extra}".rstrip()


def _user_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides minus the keys a layout sets itself."""
    owned = (
        "parallel.engine",
        "parallel.zero_stage",
        "parallel.offload",
        "parallel.tp",
        "parallel.pp",
        "parallel.pp_schedule",
        "parallel.pp_virtual",
        "parallel.pp_split",
        "train.activation_checkpointing",
        "train.micro_batch",
        "train.grad_accum",
    )
    return [o for o in overrides if o.split("=", 1)[0] not in owned]


def gib(b: float) -> str:
    return f"{b / GiB:,.2f} GiB"


def breakdown_lines(c: Candidate, acc: Accelerator, headroom: float) -> list[str]:
    mem, lay = c.memory, c.layout
    lines = []
    names = {
        "parameters": "parameters (held between steps)",
        "gradients": "gradients (when backward ends)",
        "optimizer": "optimizer state",
        "gathered": "gathered parameters / comm buffers",
        "activations": "activations (saved for backward)",
        "logits": "logits and loss (transient)",
    }
    for k in CATEGORY_NAMES:
        lines.append(f"  {names[k]:<38} {gib(getattr(mem, k)):>13}")
    if mem.cpu:
        lines.append(f"  {'in CPU memory (offload)':<38} {gib(mem.cpu):>13}")
    lines.append(f"  {'peak per rank':<38} {gib(mem.peak):>13}   at {mem.peak_at}; usable {gib(usable(acc, headroom))}")
    if lay.pp > 1:
        per = ", ".join(gib(r["peak"]) for r in mem.per_pp_rank)
        lines.append(f"  peak per pipeline rank: {per}")
    cost = c.cost
    lines.append(
        f"  {cost.flops_per_rank / 1e12:,.1f} TFLOP per rank per step; per step each rank moves "
        f"dp {cost.dp_bytes / GB:,.2f} GB, tp {cost.tp_bytes / GB:,.2f} GB, pp {cost.pp_bytes / GB:,.2f} GB"
        + (f", cp {cost.cp_bytes / GB:,.2f} GB" if cost.cp_bytes else "")
    )
    bubble = f", bubble {cost.bubble:.0%}" if lay.pp > 1 else ""
    lines.append(
        f"  estimated step {cost.step_s:,.3f} s (compute {cost.compute_s:,.3f} s, communication {cost.comm_s:,.3f} s"
        f"{bubble})"
    )
    return lines


def describe_model(model_cfg: ModelConfig) -> str:
    return f"{model_cfg.arch} {n_params(model_cfg) / 1e9:,.2f}B parameters ({model_cfg.n_layer} layers x {model_cfg.d_model})"


def run_plan(
    cfg: Config,
    config_path: str,
    overrides: list[str],
    gpus: int,
    acc: Accelerator,
    headroom: float = 0.9,
    efficiency: float = DEFAULT_EFFICIENCY,
    as_json: bool = False,
    measure: bool = False,
) -> dict:
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: give the number of GPUs to plan for (1 or more)")
    model_cfg, source = plan_model(cfg)
    seq = cfg.data.seq_len
    own = Layout.from_config(cfg, gpus)
    mine = evaluate(model_cfg, own, seq, acc, headroom, efficiency)
    ranked = search(model_cfg, own, seq, acc, headroom, efficiency)
    best = next((c for c in ranked if c.fits), None)
    user = _user_overrides(overrides)
    command = launch_command(config_path, user, best.layout, acc) if best else None
    per_token, _ = model_flops(model_cfg, seq)
    result = {
        "model": {"arch": model_cfg.arch, "n_params": n_params(model_cfg), "seq_len": seq, "source": source},
        "cluster": {
            "gpus": gpus,
            "gpus_per_node": acc.gpus_per_node,
            "gpu": acc.name,
            "memory_bytes": acc.memory,
            "usable_bytes": usable(acc, headroom),
            "peak_flops": acc.peak_flops,
            "intra_node_bytes_per_s": acc.intra_node_bw,
            "inter_node_bytes_per_s": acc.inter_node_bw,
            "efficiency": efficiency,
        },
        "global_batch": own.micro_batch * own.grad_accum * own.dp,
        "flops_per_token": per_token,
        "layout": mine.as_dict(),
        "candidates": [c.as_dict() for c in ranked],
        "command": command,
    }
    if measure:
        from trainer.plan.fake import measure_fake

        result["measured"] = measure_fake(cfg, model_cfg, gpus)
    if as_json:
        print(json.dumps(result))
        return result
    tokens = result["global_batch"] * seq
    print(
        f"{describe_model(model_cfg)}, seq {seq}, global batch {result['global_batch']} ({tokens:,} tokens), "
        f"{cfg.train.precision} | {gpus} x {acc.describe()} | {source}"
    )
    print(f"\nThis config's layout: {own.describe()}")
    if mine.memory is None:
        print(f"  cannot run: {mine.reason}")
    else:
        print("\n".join(breakdown_lines(mine, acc, headroom)))
        print(f"  {'fits' if mine.fits else 'does NOT fit: ' + mine.reason}")
    if "measured" in result:
        m = result["measured"]
        print(
            f"  measured on fake tensors (--measure, rank 0 of {gpus} simulated): peak {gib(m['peak'])} against the "
            f"formula's {gib(mine.memory.peak)} ({m['peak'] / mine.memory.peak - 1:+.1%})"
        )
    fits = [c for c in ranked if c.fits]
    print(f"\n{len(fits)} of {len(ranked)} layouts fit; the fastest (estimated step time):")
    print(f"  {'layout':<64} {'peak/rank':>11} {'step s':>8} {'tokens/s':>11}")
    for c in fits[:SHOWN]:
        print(
            f"  {c.layout.describe():<64} {c.memory.peak / GiB:>8.1f} GiB {c.cost.step_s:>8.3f} "
            f"{tokens / c.cost.step_s:>11,.0f}"
        )
    over = [c for c in ranked if not c.fits and c.memory is not None]
    if over:
        print("closest that do not fit:")
        for c in over[:3]:
            print(f"  {c.layout.describe()}: {c.reason}")
    if command:
        print(f"\nrun the best:\n  {command}")
    else:
        print("\nnothing fits: add GPUs, use bigger ones (--gpu), or shorten data.seq_len")
    return result
