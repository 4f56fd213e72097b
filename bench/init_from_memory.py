"""Peak resident memory per rank of starting a run from a Hugging Face checkpoint (`model.init_from`).

Makes a smollm2-360m-shaped LlamaForCausalLM checkpoint with transformers (random weights, 361,821,120 parameters,
1.45 GB of fp32 safetensors; nothing downloaded), then builds the run's engine from it as `trainer train` does
(config, checkpoint verification, meta-device model, sharding, loading each rank's slices, optimizer), in fresh
processes: 1 process (ddp: the whole model, the reference) and 2 ranks under fsdp ZeRO-3 (each rank holds half).
Each process reports its peak RSS (VmHWM) after the build and the RSS before it (torch and the libraries alone).

    python bench/init_from_memory.py            # about 3 minutes on 2 cores, 6 GB of disk in a temporary directory
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "INIT_FROM_BENCH "


def vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def worker(checkpoint: str, engine: str) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from trainer.build import build_model, engine_config, resolve_model
    from trainer.config import load_config
    from trainer.parallel import init_distributed, shutdown_distributed
    from trainer.tokenizer import load_tokenizer

    before = vm("VmRSS")
    cfg = load_config(
        None,
        [
            "model.arch=llama",
            f"model.init_from={checkpoint}",
            f"data.train={REPO / 'data' / 'shakespeare' / 'train.txt'}",
            f"data.tokenizer={checkpoint}/tokenizer.json",
            "data.seq_len=64",
            f"parallel.engine={engine}",
            "log.wandb.mode=disabled",
        ],
    )
    tok = load_tokenizer(cfg.data.tokenizer)
    t0 = time.perf_counter()
    model_cfg = resolve_model(cfg, tok)
    dims, device = init_distributed(1, need_group=engine != "ddp", timeout_s=600)
    engine_, counts = build_model(cfg, dims, device, model_cfg, engine_config(cfg, model_cfg), pretrained=True)
    seconds = time.perf_counter() - t0
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in engine_.module.parameters())
    print(
        MARK
        + json.dumps(
            {
                "engine": engine,
                "rank": dims.rank,
                "world": dims.world_size,
                "rss_before": before,
                "peak_rss": vm("VmHWM"),
                "params_held": held,
                "n_params": counts["n_params"],
                "seconds": seconds,
            }
        ),
        flush=True,
    )
    torch.distributed.barrier() if torch.distributed.is_initialized() else None
    shutdown_distributed()


def make_checkpoint(directory: Path) -> None:
    import shutil

    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(directory, max_shard_size="500MB")  # sharded, with its index, as published models are
    del model
    tok = REPO / "tests" / "fixtures" / "legacy" / "gpt" / "tokenizer.json"
    shutil.copy(tok, directory / "tokenizer.json")


def run(nproc: int, checkpoint: Path, engine: str) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", str(checkpoint), engine]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    rows = [json.loads(x[len(MARK) :]) for x in out.stdout.splitlines() if x.startswith(MARK)]
    if out.returncode or len(rows) != nproc:
        raise SystemExit(f"{engine} x {nproc} failed:\n{out.stderr[-3000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "smollm2-360m-random"
        t0 = time.perf_counter()
        make_checkpoint(ckpt)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        print(
            f"checkpoint: {size / 1e9:.2f} GB of safetensors in {len(list(ckpt.glob('*.safetensors')))} shards "
            f"({time.perf_counter() - t0:.0f} s to make)",
            flush=True,
        )
        rows = run(1, ckpt, "ddp") + run(2, ckpt, "fsdp")
    print("\n| layout | rank | parameters held | RSS before | peak RSS after the build | build s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        layout = "ddp, 1 process" if r["engine"] == "ddp" else f"fsdp ZeRO-3, {r['world']} ranks"
        print(
            f"| {layout} | {r['rank']} | {r['params_held']:,} of {r['n_params']:,} | {r['rss_before'] / 2**30:.2f} GiB "
            f"| {r['peak_rss'] / 2**30:.2f} GiB | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
