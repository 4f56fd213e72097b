"""Model families: checkpoints from before families were folders, the Llama family against transformers, the
registry's reach. (Hugging Face import/export round trips live in test_export.py; layouts in test_parallel.py.)"""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from trainer.checkpoint import latest_checkpoint, load_model
from trainer.config import load_config
from trainer.export import export_hf
from trainer.models import build_model, count_params
from trainer.train import train

REPO = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).parent / "fixtures" / "legacy"


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_checkpoints_written_before_families_still_load(arch, tmp_path, monkeypatch):
    """step_2 of a 4-step run written by the code before the restructure (blocks a ModuleList, one ModelConfig with
    every family's fields) resumes: steps 3-4 give the losses that code logged and the weights it ended with."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(LEGACY / "corpus.txt", "corpus.txt")
    (tmp_path / "tok").mkdir()
    shutil.copy(LEGACY / arch / "tokenizer.json", "tok/tokenizer.json")
    shutil.copytree(LEGACY / arch / "step_2", "run/checkpoints/step_2")
    overrides = (
        f"model.arch={arch} model.n_layer=2 model.n_head=2 model.d_model=16 model.max_seq_len=32 "
        "data.train=[corpus.txt] data.tokenizer=tok/tokenizer.json data.seq_len=32 data.num_workers=0 data.streams=1 "
        "train.steps=4 train.micro_batch=2 train.warmup_steps=1 train.eval_every=0 checkpoint.every=2 "
        "checkpoint.keep=2 log.every=1 log.wandb.mode=disabled run.dir=run run.seed=7"
    ).split()
    train(load_config(None, overrides))
    records = [json.loads(line) for line in Path("run/metrics.jsonl").read_text().splitlines()]
    assert records[0]["resumed_from_step"] == 2
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    expected = {int(k): v for k, v in json.loads((LEGACY / arch / "losses.json").read_text()).items()}
    assert losses.keys() == {3, 4}
    for step in (3, 4):
        assert math.isclose(losses[step], expected[step], rel_tol=1e-6), (step, losses[step], expected[step])
    final = load_model(latest_checkpoint(Path("run/checkpoints"))).state_dict()
    for name, value in load_file(LEGACY / arch / "step_4_weights.safetensors").items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6, msg=name)
    assert load_model("run/checkpoints/step_2").blocks["1"] is not None  # the old step_2 loads whole, too


PRESET_COUNTS = {
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "llama3.2-1b": 1_235_814_400,
    "qwen3-0.6b": 596_049_920,
}


@pytest.mark.parametrize(("preset", "count"), PRESET_COUNTS.items())
def test_llama_presets_have_the_published_parameter_counts(preset, count):
    with torch.device("meta"):
        assert count_params(build_model("llama", preset)) == count


def perturbed_llama(**dims) -> torch.nn.Module:
    """A tiny Llama with non-trivial norms (unit norms would hide a norm applied to the wrong tensor)."""
    torch.manual_seed(0)
    model = build_model("llama", "llama-tiny", **dims).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


LLAMA_VARIANTS = {
    "gqa": {},
    "mha-untied": {"n_kv_heads": 4},
    "tied-llama3-rope": {
        "tie_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    "qwen3-qk-norm": {"qk_norm": True, "head_dim": 32, "tie_embeddings": True, "rope_theta": 1e6, "norm_eps": 1e-6},
}


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_llama_logits_equal_transformers(variant, tmp_path):
    """Exported, the model loads as LlamaForCausalLM (Qwen3ForCausalLM with QK-norm) and gives the same logits
    (fp32, 1e-4) over 100 positions: RoPE (and Llama 3's scaling past its original context), GQA, RMSNorm, SwiGLU."""
    model = perturbed_llama(**LLAMA_VARIANTS[variant])
    out = export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected_class = "Qwen3ForCausalLM" if model.config.qk_norm else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    ids = torch.randint(0, model.config.vocab_size, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert count_params(model) == sum(p.numel() for p in hf.parameters())


def test_a_new_family_touches_only_its_folder_and_the_registry(tmp_path):
    """The registry's promise, checked by doing it: a copy of the llama family under another name, registered with
    one line, trains a step through the whole trainer (config, data, loop, engine, export) with nothing else
    changed; and no file outside trainer/models/ names a family."""
    name = r"""["'](gpt|bert|llama)["']"""
    branch = re.compile(rf"(==|!=)\s*{name}|{name}\s*(==|!=)|\bin\s*[(\[{{][^)\]}}]*{name}")
    outside = [p for p in (REPO / "trainer").rglob("*.py") if "models" not in p.relative_to(REPO / "trainer").parts]
    for path in [*outside, *(REPO / "launch").rglob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not branch.search(line), f"{path.relative_to(REPO)}:{number} branches on a family: {line.strip()}"
    # model code stays free of distributed code: only the plans (tensor_parallel.py, tp_plans.py) import it
    for path in (REPO / "trainer" / "models").rglob("*.py"):
        if path.name not in ("tensor_parallel.py", "tp_plans.py"):
            imports = re.search(r"^\s*(import|from) torch\.distributed", path.read_text(), re.MULTILINE)
            assert imports is None, f"{path.relative_to(REPO)} imports torch.distributed"
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "trainer", copy / "trainer", ignore=shutil.ignore_patterns("__pycache__"))
    family_dir = copy / "trainer" / "models" / "toyllama"
    shutil.copytree(copy / "trainer" / "models" / "llama", family_dir)
    for path in family_dir.glob("*.py"):
        path.write_text(path.read_text().replace("trainer.models.llama", "trainer.models.toyllama"))
    init = family_dir / "__init__.py"
    init.write_text(init.read_text().replace('arch="llama"', 'arch="toyllama"').replace('title="Llama"', 'title="Toy"'))
    cfg = family_dir / "config.py"
    cfg.write_text(cfg.read_text().replace('arch = "llama"', 'arch = "toyllama"'))
    registry = copy / "trainer" / "models" / "registry.py"
    text = registry.read_text()
    registry.write_text(
        text.replace(
            '    "llama": "trainer.models.llama",\n',
            '    "llama": "trainer.models.llama",\n    "toyllama": "trainer.models.toyllama",\n',
        )
    )
    shutil.copy(LEGACY / "corpus.txt", tmp_path / "corpus.txt")
    overrides = (
        f"model.arch=toyllama model.preset=llama-tiny data.train=[{tmp_path / 'corpus.txt'}] data.num_workers=0 "
        f"data.tokenizer={LEGACY / 'gpt' / 'tokenizer.json'} data.seq_len=32 train.steps=2 train.micro_batch=2 "
        f"data.valid=[] train.eval_every=0 log.every=1 log.wandb.mode=disabled run.dir={tmp_path / 'run'}"
    ).split()
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "train", str(REPO / "configs" / "demo.yaml"), *overrides],
        check=False,
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Toy llama-tiny:" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["arch"] == "toyllama" and [r["step"] for r in records if "loss" in r] == [1, 2]
