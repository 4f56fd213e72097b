"""`trainer` command line: train, tokenizer, prepare, data, export, plan, report.

Bad input ends with one line `error: ...` on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import faulthandler
import os
import re
import sys
from pathlib import Path

import yaml

from trainer.errors import PeerFailure, SharedError, UserError
from trainer.writable import check_writable_dir, refusal_line


def cmd_train(args: argparse.Namespace) -> None:
    from trainer.config import load_config
    from trainer.train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, args.stop)
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(cfg.run_dir)


def _early_stop_signal():
    """The run's StopSignal, installed before the slow imports of a start-up (torch, the model, the data workers)."""
    from trainer.stop import StopSignal

    return StopSignal()


def print_summary(run_dir: Path) -> None:
    """What was trained, how well, and where to look next."""
    from trainer.checkpoint import latest_checkpoint
    from trainer.report import summarize

    try:
        s = summarize(run_dir)
    except UserError:  # nothing logged yet (e.g. stopped before the first step)
        return
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    m = cfg["model"]
    if m.get("init_from"):
        model = f"from {m['init_from']}"
    else:
        model = m.get("preset") or f"{m.get('n_layer', '?')} layers x {m.get('d_model', '?')}"
    train = cfg["data"]["train"]
    corpus = ", ".join(train) if isinstance(train, list) else "a mixture of " + ", ".join(train)
    lines = [
        (
            f"\nTrained a {m['arch']} model ({model}) for {s['final_step']} steps on "
            f"{s['tokens'] or 0:,} tokens of {corpus}; last train loss {s['last_loss'] or float('nan'):.4f}"
        )
    ]
    if s.get("last_val_loss") is not None:
        accuracy = (
            f", masked-token accuracy {100 * s['val_accuracy']:.1f}%" if s.get("val_accuracy") is not None else ""
        )
        lines.append(f"  validation:  loss {s['last_val_loss']:.4f}, perplexity {s['val_ppl']:.2f}{accuracy}")
    if s.get("mean_tokens_per_s"):
        lines.append(
            f"  throughput:  {s['mean_tokens_per_s']:,.0f} tokens/s, MFU {100 * (s.get('mean_mfu') or 0):.1f}%"
        )
    lines += [
        f"  metrics:     {run_dir / 'metrics.jsonl'}",
        f"  checkpoint:  {ckpt}" if ckpt else "  checkpoint:  none",
        f"  plot:        trainer report {run_dir}",
        f"  export:      trainer export {ckpt or run_dir} --out {run_dir / 'hf'}",
    ]
    print("\n".join(lines), flush=True)


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from trainer.tokenizer import train_tokenizer

    path = train_tokenizer(args.kind, args.vocab_size, args.inputs, args.out)
    print(f"tokenizer written to {path}")


def cmd_prepare(args: argparse.Namespace) -> None:
    import time

    from trainer.config import load_config
    from trainer.data.shards import prepare, read_meta
    from trainer.data.sources import parse_sources
    from trainer.models import family

    cfg = load_config(args.config, args.overrides)
    check_writable_dir(args.out, "--out")
    out = Path(args.out)
    train = parse_sources(cfg.data.train, cfg.data.format, cfg.data.text_field)
    jobs = [(s, out / "train" if len(train) == 1 else out / "train" / s.name) for s in train]
    if cfg.data.valid:
        valid = parse_sources(cfg.data.valid, cfg.data.format, cfg.data.text_field, key="data.valid")
        jobs += [(dataclasses.replace(s, name="valid"), out / "valid") for s in valid]
    for source, _ in jobs:
        if not source.raw:
            raise UserError(
                f"{source.label()} is already prepared (format tokens); give `trainer prepare` the raw "
                "text/jsonl/parquet files"
            )
    for source, path in jobs:
        old = read_meta(path) if path.is_dir() else None
        kept = {i["tokens"] for i in old.get("inputs", [])} if old else set()
        start = time.monotonic()
        objective = family(cfg.model.arch).objective
        meta = prepare(source, cfg.data.tokenizer, objective, path, bad_lines=cfg.data.bad_lines)
        seconds = time.monotonic() - start
        new = [i for i in meta["inputs"] if i["tokens"] not in kept]
        tokenized = sum(i["n_tokens"] for i in new)
        reused = f" ({len(meta['inputs']) - len(new)} of {len(meta['inputs'])} inputs already prepared)" if kept else ""
        print(
            f"{source.name}: {meta['n_docs']:,} documents, {meta['n_tokens']:,} tokens{reused}, {seconds:.1f} s, "
            f"{tokenized / max(seconds, 1e-9):,.0f} tokens/s -> {path}",
            flush=True,
        )
    valid_path = [str(out / "valid")] if cfg.data.valid else []
    if len(train) == 1:
        extra = f" data.valid=[{valid_path[0]}]" if valid_path else ""
        print(f"train on them with: data.train=[{out / 'train'}]{extra} data.format=tokens")
        return
    section: dict = {
        "format": "tokens",
        "train": {s.name: {"path": [str(path)], "weight": s.weight} for s, path in jobs[: len(train)]},
    }
    if valid_path:
        section["valid"] = valid_path
    print("train on them with this data section (the other data keys unchanged):")
    print(yaml.safe_dump({"data": section}, sort_keys=False, default_flow_style=None).rstrip())


def cmd_data(args: argparse.Namespace) -> None:
    import json

    from trainer.config import load_config
    from trainer.data.inspect import describe_samples

    cfg = load_config(args.config, args.overrides)
    for row in describe_samples(cfg, args.range, args.dp, args.tokens):
        print(json.dumps(row, ensure_ascii=False), flush=True)


def cmd_export(args: argparse.Namespace) -> None:
    from trainer.checkpoint import load_model, resolve_checkpoint_dir
    from trainer.export import export_hf
    from trainer.tokenizer import load_tokenizer

    ckpt = resolve_checkpoint_dir(args.checkpoint)
    check_writable_dir(args.out, "--out")  # before the (long) consolidation of the checkpoint
    model = load_model(ckpt)
    tok_file = ckpt / "tokenizer.json"
    special = None
    if tok_file.is_file():
        tok = load_tokenizer(tok_file)
        special = {k: getattr(tok, k) for k in ("eos_id", "cls_id", "sep_id", "mask_id", "pad_id", "unk_id")}
    out = export_hf(model, args.out, tokenizer_json=tok_file if tok_file.is_file() else None, special_token_ids=special)
    print(f"exported {ckpt} to {out} (config.json, model.safetensors{', tokenizer.json' if special else ''})")


def cmd_plan(args: argparse.Namespace) -> None:
    from trainer.config import load_config
    from trainer.plan.hardware import accelerator
    from trainer.plan.report import run_plan

    cfg = load_config(args.config, args.overrides)
    acc = accelerator(
        args.gpu, args.gpu_memory, args.peak_tflops, args.intra_node_gbps, args.inter_node_gbps, args.gpus_per_node
    )
    if not 0 < args.headroom <= 1 or not 0 < args.efficiency <= 1:
        raise UserError("--headroom and --efficiency are fractions in (0, 1]")
    run_plan(
        cfg,
        args.config,
        args.overrides,
        args.gpus,
        acc,
        headroom=args.headroom,
        efficiency=args.efficiency,
        as_json=args.json,
        measure=args.measure,
    )


def cmd_report(args: argparse.Namespace) -> None:
    from trainer.report import make_report

    print(f"plot written to {make_report(args.run_dir)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer", description="Pretrain GPT- and BERT-style models.")
    # DeepSpeed's `deepspeed` launcher passes --local_rank=N; the rank comes from LOCAL_RANK, which it also sets
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (one process of a run; under torchrun it reads RANK/WORLD_SIZE)")
    t.add_argument("config", help="YAML config")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4")
    t.set_defaults(func=cmd_train)

    k = sub.add_parser("tokenizer", help="train a tokenizer with HF tokenizers")
    k.add_argument(
        "--kind",
        choices=["bpe", "wordpiece", "char"],
        required=True,
        help="bpe for GPT, wordpiece for BERT, char for GPT with one token per character of the inputs",
    )
    k.add_argument("--vocab-size", type=int, help="vocabulary size (required for bpe and wordpiece; not for char)")
    k.add_argument("--out", required=True, help="directory; tokenizer.json is written into it")
    k.add_argument("inputs", nargs="+", help="text/jsonl/parquet files or globs")
    k.set_defaults(func=cmd_tokenizer)

    r = sub.add_parser("prepare", help="pre-tokenize data.train/data.valid into token shards (data.format=tokens)")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*")
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_prepare)

    d = sub.add_parser("data", help="print where global samples come from: one JSON line per sample")
    d.add_argument("config")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--range", required=True, help="A:B, global samples A (included) to B (excluded)")
    d.add_argument("--dp", type=int, default=1, help="data-parallel size: which rank takes each sample")
    d.add_argument("--tokens", type=int, default=16, help="first tokens of each sample to decode")
    d.set_defaults(func=cmd_data)

    e = sub.add_parser("export", help="export a checkpoint in the Hugging Face layout")
    e.add_argument("checkpoint", help="checkpoints/step_<N> (or a run directory: its latest checkpoint)")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)

    pl = sub.add_parser(
        "plan", help="per-rank memory of the config's layout and the layouts that fit a cluster, ranked by step time"
    )
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help="section.key=value overrides, as for train")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    pl.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the GPU's usual 8)")
    pl.add_argument("--gpu", help="h100 (default), h200, b200, a100, a100-40g, l40s, a10g, v100, mi300x")
    pl.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GiB (overrides the table's)")
    pl.add_argument("--peak-tflops", type=float, help="dense bf16 peak TFLOP/s per GPU (overrides the table's)")
    pl.add_argument("--intra-node-gbps", type=float, help="GB/s per GPU within a node, one direction")
    pl.add_argument("--inter-node-gbps", type=float, help="GB/s per GPU across nodes, one direction")
    pl.add_argument("--efficiency", type=float, default=0.45, help="share of peak FLOP/s reached (default 0.45)")
    pl.add_argument("--headroom", type=float, default=0.9, help="usable share of GPU memory (default 0.9)")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    pl.add_argument("--measure", action="store_true", help="also measure the layout's peak on fake tensors")
    pl.set_defaults(func=cmd_plan)

    rp = sub.add_parser("report", help="draw loss, learning rate and throughput curves of a run into a PNG")
    rp.add_argument("run_dir")
    rp.set_defaults(func=cmd_report)
    return p


# the subcommands that take section.key=value overrides, anywhere on their command line
OVERRIDE_COMMANDS = ("train", "prepare", "data", "plan")
# what a command writes, for the line that reports a file-system refusal (a read-only mount, a permission)
WRITES = {
    "train": "run.dir and everything under it must be writable: give run.dir a writable location",
    "tokenizer": "give --out a writable directory",
    "prepare": "give --out a writable directory",
    "export": "give --out a writable directory",
    "report": "the plot is written into RUN_DIR: make it writable, or copy the run somewhere writable",
}
_OVERRIDE = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+=.*", re.DOTALL)


def place_overrides(args: argparse.Namespace, extra: list[str]) -> None:
    """Overrides anywhere on the line: argparse takes the positionals before the first option (CONFIG and any
    overrides there) and leaves the words after options in `extra`. CONFIG is the first positional that is not a
    `section.key=value` override; all the others are overrides, in the order given."""
    words = [args.config, *args.overrides, *extra]
    at = next((i for i, w in enumerate(words) if not _OVERRIDE.fullmatch(w)), 0)
    args.config = words.pop(at)
    args.overrides = words


def say_error(message: str, shared: bool = False) -> None:
    """Prints `error: message` once for the job. Before the ranks join a process group every rank checks the same
    config and fails the same way: rank 0 says it once. After, an error may be one rank's own (its data, its files):
    that rank says it, prefixed, unless it is `shared` (one decision every rank raises)."""
    from trainer.parallel.dims import JOINED

    rank = os.environ.get("RANK")
    if rank in (None, "0") or (JOINED["group"] and not shared):
        stage = f", pipeline stage {JOINED['stage']}" if JOINED["stage"] is not None else ""
        prefix = f"[rank {rank}{stage}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {message}", file=sys.stderr, flush=True)


def end_rank_process() -> None:
    """Exit 0 at once after a finished multi-rank run, its process group already destroyed and every write flushed:
    Python's own teardown after a gloo job can abort the process ("terminate called without an active exception",
    exit -6, seen about once in 200 launches here), and torchrun would then fail a job that completed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in OVERRIDE_COMMANDS and all("=" in x and not x.startswith("-") for x in extra):
        place_overrides(args, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.stop = None
    if args.command == "train":
        from trainer.lifetime import follow_parent

        follow_parent()  # under a torchrun agent: die with it, never train on as an orphan
        # a rank killed by a fatal signal (a C++ abort or segfault in a library) prints where each thread was in
        # Python, which torchrun's own report ("exitcode -6") does not say
        if not faulthandler.is_enabled():
            with contextlib.suppress(ValueError):  # stderr without a file descriptor (a caller capturing it)
                faulthandler.enable()
        args.stop = _early_stop_signal()  # SIGTERM/SIGUSR1 are remembered from here on (stop at a step boundary)
    try:
        args.func(args)
        if args.command == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            end_rank_process()
    except UserError as e:
        say_error(str(e), shared=isinstance(e, SharedError))
        sys.exit(2)
    except OSError as e:
        refused = refusal_line(e, WRITES.get(args.command, "fix the path or its permissions"))
        if refused:
            say_error(refused)
            sys.exit(2)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(
            f"error: the disk is full{where} ({e.strerror}): free space there and run the same command; complete "
            f"checkpoints are never touched by a failed write",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    except PeerFailure as e:  # another rank died or hung: this rank says which, once, and fails the job
        print(f"[rank {os.environ.get('RANK', '0')}] error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            if args.command == "train":
                line = (
                    "interrupted (Ctrl-C): stopped at once, without a checkpoint; the same command resumes from the "
                    "last complete one (SIGTERM or SIGUSR1 would have checkpointed first)"
                )
            else:  # no run is at stake: say what stopped and how to finish
                again = {"prepare": "; run it again: inputs it finished are kept"}.get(args.command, "")
                line = f"interrupted (Ctrl-C): `trainer {args.command}` stopped{again}"
            print(line, file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
