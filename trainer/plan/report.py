"""`trainer plan`: the config's layout broken down per rank, the layouts that fit ranked by estimated step time, and the
command that runs the best one; `--json` gives the same as one object."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

from trainer.config import Config
from trainer.errors import UserError
from trainer.models import ModelConfig, resolve_model_config
from trainer.plan.cost import DEFAULT_EFFICIENCY, model_flops
from trainer.plan.hardware import Accelerator
from trainer.plan.memory import Layout, n_params
from trainer.plan.search import CATEGORY_NAMES, Candidate, evaluate, search, usable
from trainer.plan.units import binary_bytes, count, decimal_bytes, flops, seconds

SHOWN = 10  # ranked layouts printed (--json has them all)


def plan_model(cfg: Config) -> tuple[ModelConfig, str]:
    """The model's shape as `trainer train` resolves it, and where its vocabulary came from (said in the header):
    model.vocab_size when given, else the tokenizer when its file is there, else the preset or the model settings."""
    from trainer.build import resolve_model

    m = cfg.model
    tok_path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    given = m.dims.get("vocab_size") is not None
    if m.init_from:
        stand_in = SimpleNamespace(vocab_size=0, eos_id=0, cls_id=0, sep_id=0, mask_id=0)
        model_cfg = resolve_model(cfg, stand_in)
        return model_cfg, f"shape and vocabulary {model_cfg.vocab_size:,} from {m.init_from}{_padding(model_cfg)}"
    if tok_path is not None and tok_path.exists():
        from trainer.tokenizer import load_tokenizer

        model_cfg = resolve_model(cfg, load_tokenizer(tok_path))
        where = "model.vocab_size" if given else f"the tokenizer {tok_path}"
    else:
        dims = {k: v for k, v in m.dims.items() if v is not None}
        shape = resolve_model_config(m.arch, m.preset, **dims)
        stand_in = SimpleNamespace(vocab_size=shape.vocab_size, eos_id=0, cls_id=0, sep_id=0, mask_id=0)
        model_cfg = resolve_model(cfg, stand_in)
        where = "model.vocab_size" if given else (f"preset {m.preset}" if m.preset else "the model settings")
        if tok_path is not None and not given:
            where += f" (no tokenizer file at {tok_path})"
    return model_cfg, f"vocabulary {model_cfg.vocab_size:,} from {where}{_padding(model_cfg)}"


def _padding(model_cfg: ModelConfig) -> str:
    rows = getattr(model_cfg, "padded_vocab_size", model_cfg.vocab_size)
    return f", padded to {rows:,} rows" if rows != model_cfg.vocab_size else ""


def launch_command(config: str, cfg: Config, user_overrides: list[str], layout: Layout, acc: Accelerator) -> str:
    """The command that starts exactly `layout` on `layout.world` ranks: `launch local` on one node, `launch slurm`
    over whole nodes (a world that does not fill them is refused before any search, in `run_plan`). Every layout key
    is set, whatever the config file says, and each word is quoted for a POSIX shell."""
    words = _user_overrides(user_overrides) + layout.overrides()
    set_keys = {w.split("=", 1)[0] for w in words}
    for key in ("pp_schedule", "pp_virtual", "pp_split"):  # what the config file holds but this layout does not use
        if f"parallel.{key}" not in set_keys and getattr(cfg.parallel, key) != _config_value(layout, key):
            words.append(f"parallel.{key}={_yaml_word(_config_value(layout, key))}")
    extra = " ".join(shlex.quote(w) for w in [config, *words])
    gpus, per_node = layout.world, acc.gpus_per_node
    if gpus <= per_node:
        return f"launch local --nproc-per-node {gpus} -- {extra}"
    return f"launch slurm --nodes {gpus // per_node} --gpus-per-node {per_node} -- {extra}"


def _config_value(layout: Layout, key: str) -> object:
    """The layout's value of a parallel key as the config holds it (a list, not a tuple)."""
    value = getattr(layout, key)
    return list(value) if isinstance(value, tuple) else value


def _yaml_word(value: object) -> str:
    """A value as one YAML word for a `section.key=value` override."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def check_whole_nodes(gpus: int, per_node: int) -> None:
    """A multi-node job runs the same number of ranks on every node: refuse a GPU count that does not fill whole
    nodes rather than plan for one world size and print a command that starts another."""
    if gpus > per_node and gpus % per_node:
        fit = max(d for d in range(1, per_node + 1) if gpus % d == 0)
        below, above = gpus // per_node * per_node, (gpus // per_node + 1) * per_node
        raise UserError(
            f"--gpus {gpus} is not a whole number of {per_node}-GPU nodes (--gpus-per-node {per_node}): plan for "
            f"{below} or {above} GPUs, or give --gpus-per-node {fit} to run {fit} ranks on each of {gpus // fit} nodes"
        )


def _user_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides minus the keys a layout sets itself."""
    owned = (
        "parallel.engine",
        "parallel.zero_stage",
        "parallel.offload",
        "parallel.tp",
        "parallel.pp",
        "parallel.cp",
        "parallel.pp_schedule",
        "parallel.pp_virtual",
        "parallel.pp_split",
        "train.activation_checkpointing",
        "train.micro_batch",
        "train.grad_accum",
    )
    return [o for o in overrides if o.split("=", 1)[0] not in owned]


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
        lines.append(f"  {names[k]:<38} {binary_bytes(getattr(mem, k)):>13}")
    if mem.cpu:
        lines.append(f"  {'in CPU memory (offload)':<38} {binary_bytes(mem.cpu):>13}")
    limit = binary_bytes(usable(acc, headroom))
    lines.append(f"  {'peak per rank':<38} {binary_bytes(mem.peak):>13}   at {mem.peak_at}; usable {limit}")
    if lay.pp > 1:
        per = ", ".join(binary_bytes(r["peak"]) for r in mem.per_pp_rank)
        lines.append(f"  peak per pipeline rank: {per}")
    cost = c.cost
    lines.append(
        f"  {flops(cost.flops_per_rank)} per rank per step; per step each rank moves "
        f"dp {decimal_bytes(cost.dp_bytes)}, tp {decimal_bytes(cost.tp_bytes)}, pp {decimal_bytes(cost.pp_bytes)}"
        + (f", cp {decimal_bytes(cost.cp_bytes)}" if cost.cp_bytes else "")
    )
    bubble = f", bubble {cost.bubble:.0%}" if lay.pp > 1 else ""
    lines.append(
        f"  estimated step {seconds(cost.step_s)} (compute {seconds(cost.compute_s)}, communication "
        f"{seconds(cost.comm_s)}{bubble})"
    )
    return lines


def describe_model(model_cfg: ModelConfig) -> str:
    n = count(n_params(model_cfg))
    return f"{model_cfg.arch} {n} parameters ({model_cfg.n_layer} layers x {model_cfg.d_model})"


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
    """Plans `cfg` on `gpus` GPUs of `acc`: prints the report (or one JSON object) and returns it as a dict."""
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: give the number of GPUs to plan for (1 or more)")
    check_whole_nodes(gpus, acc.gpus_per_node)
    model_cfg, source = plan_model(cfg)
    seq = cfg.data.seq_len
    own = Layout.from_config(cfg, gpus)
    mine = evaluate(model_cfg, own, seq, acc, headroom, efficiency)
    ranked = search(model_cfg, own, seq, acc, headroom, efficiency)
    best = next((c for c in ranked if c.fits), None)
    command = launch_command(config_path, cfg, overrides, best.layout, acc) if best else None
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
            f"  measured on fake tensors (--measure, rank 0 of {gpus} simulated): peak {binary_bytes(m['peak'])} "
            f"against the formula's {binary_bytes(mine.memory.peak)} ({m['peak'] / mine.memory.peak - 1:+.1%})"
        )
    fits = [c for c in ranked if c.fits]
    print(f"\n{len(fits)} of {len(ranked)} layouts fit; the fastest (estimated step time):")
    print(f"  {'layout':<64} {'peak/rank':>12} {'step':>10} {'tokens/s':>13}")
    for c in fits[:SHOWN]:
        print(
            f"  {c.layout.describe():<64} {binary_bytes(c.memory.peak):>12} {seconds(c.cost.step_s):>10} "
            f"{tokens / c.cost.step_s:>13,.0f}"
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
