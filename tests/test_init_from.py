"""`model.init_from`: runs started from checkpoints that transformers saved (tiny random dimensions, nothing
downloaded) have transformers' loss at step 1 under ddp and under fsdp ZeRO-3 x tp, GPT-2's own vocabulary under tp
(padded rows); export of such a run loads back through init_from with the same logits; damaged checkpoints, a
tokenizer that does not fit, and a contradicted architecture are one line and nothing is written."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import read_metrics, run_cli, torchrun, write_config
from safetensors.torch import load_file, save_file

from trainer.build import resolve_model
from trainer.checkpoint import latest_checkpoint, load_model
from trainer.config import load_config
from trainer.data import build_stream
from trainer.errors import UserError
from trainer.export import export_hf
from trainer.init_from import load_hf_weights
from trainer.models import build_model
from trainer.parallel import check_tp_degree
from trainer.tokenizer import load_tokenizer
from trainer.train import train

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
TOKENIZER = LEGACY / "gpt" / "tokenizer.json"  # a 300-token bpe tokenizer with an end-of-text token
SEQ, MICRO, ACCUM = 32, 2, 2


def hf_checkpoint(path: Path, kind: str = "llama", vocab_size: int = 304) -> Path:
    """A tiny random checkpoint saved by transformers itself, with our tokenizer beside it."""
    torch.manual_seed(0)
    common = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "bert":
        config = transformers.BertConfig(**common, num_attention_heads=4, max_position_embeddings=64)
        model = transformers.BertForMaskedLM(config)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=5e5
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen3Config(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
        model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # non-trivial norms: unit ones would hide a norm that is not loaded
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    shutil.copy(LEGACY / ("bert" if kind == "bert" else "gpt") / "tokenizer.json", path / "tokenizer.json")
    return path


ARCH = {"llama": "llama", "qwen3": "llama", "gpt2": "gpt", "bert": "bert"}


def run_config(tmp_path: Path, init_from: Path, kind: str = "llama") -> dict:
    shutil.copy(LEGACY / "corpus.txt", tmp_path / "corpus.txt")
    return {
        "run": {"dir": str(tmp_path / "run"), "seed": 3},
        "model": {"arch": ARCH[kind], "init_from": str(init_from)},
        "data": {"train": [str(tmp_path / "corpus.txt")], "seq_len": SEQ, "num_workers": 0, "streams": 4},
        "train": {"steps": 1, "micro_batch": MICRO, "grad_accum": ACCUM, "warmup_steps": 0, "eval_every": 0},
        "checkpoint": {"every": 0},
        "log": {"every": 1, "wandb": {"mode": "disabled"}},
    }


def transformers_loss(ckpt: Path, corpus: Path, kind: str = "llama") -> float:
    """transformers' token-mean loss on the run's first global batch (the trainer's own stream, one rank)."""
    auto = transformers.AutoModelForMaskedLM if kind == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(ckpt).eval()
    stream = build_stream(
        [str(corpus)],
        tokenizer_path=ckpt / "tokenizer.json",
        objective="masked" if kind == "bert" else "causal",
        seq_len=SEQ,
        seed=3,
        dp_rank=0,
        dp_size=1,
        micro_batch=MICRO * ACCUM,
        streams=4,
        num_workers=0,
    )
    batch = next(iter(stream))
    stream.close()
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).item()


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2", "bert"])
def test_step_one_has_transformers_loss_and_export_round_trips(kind, tmp_path):
    ckpt = hf_checkpoint(tmp_path / "hf", kind)
    train(load_config(write_config(run_config(tmp_path, ckpt, kind), tmp_path / "cfg.yaml")))
    (step1,) = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert math.isclose(step1["loss"], transformers_loss(ckpt, tmp_path / "corpus.txt", kind), rel_tol=1e-5)
    # export what was trained, load it back through init_from: the same logits as the checkpoint
    trained = load_model(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    out = export_hf(trained, tmp_path / "exported", tokenizer_json=TOKENIZER)
    again = build_model(ARCH[kind], None, **{k: v for k, v in trained.config.to_dict().items() if k != "arch"})
    load_hf_weights(again, out)
    ids = torch.randint(0, 300, (2, 24))
    assert (trained.config.vocab_size, trained.config.padded_vocab_size) == (304, 384)  # run default: rows padded
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids), trained(ids), rtol=0, atol=0)
        auto = transformers.AutoModelForMaskedLM if kind == "bert" else transformers.AutoModelForCausalLM
        hf = auto.from_pretrained(out).eval()
        torch.testing.assert_close(hf(ids).logits, trained(ids), rtol=1e-4, atol=1e-4)


def test_fsdp_zero3_x_tp_ranks_start_from_the_checkpoint(tmp_path):
    """4 ranks, dp 2 x tp 2 under fsdp ZeRO-3: each reads its slices; step 1's loss is transformers' loss."""
    ckpt = hf_checkpoint(tmp_path / "hf")
    cfg = run_config(tmp_path, ckpt)
    cfg["parallel"] = {"engine": "fsdp", "tp": 2, "zero_stage": 3}
    cfg["train"]["micro_batch"] = 1  # 1 x 2 accumulation x 2 dp ranks: the global batch of the one-rank reference
    result = torchrun(4, write_config(cfg, tmp_path / "cfg.yaml"), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    (step1,) = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert math.isclose(step1["loss"], transformers_loss(ckpt, tmp_path / "corpus.txt"), rel_tol=1e-5)
    # round trip under the same layout: export what was trained, start a run from the export at lr 0 (AdamW then
    # leaves every weight as it is): its checkpoint holds exactly the first run's weights
    trained = load_model(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    export_hf(trained, tmp_path / "exported", tokenizer_json=TOKENIZER)
    again = {**cfg, "run": {"dir": str(tmp_path / "again"), "seed": 3}}
    again["model"] = {"arch": "llama", "init_from": str(tmp_path / "exported")}
    again["train"] = {**cfg["train"], "lr": 0.0, "min_lr": 0.0}
    result = torchrun(4, write_config(again, tmp_path / "again.yaml"), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = load_model(latest_checkpoint(tmp_path / "again" / "checkpoints")).state_dict()
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0, msg=name)


def test_pipeline_stages_start_from_the_checkpoint(tmp_path):
    """pp 2 (1F1B over the 2 accumulation micro-batches) from GPT-2's checkpoint: each stage reads its layers, the
    last stage's copy of the tied head reads the embedding; step 1's loss is transformers' loss."""
    ckpt = hf_checkpoint(tmp_path / "hf", "gpt2")
    cfg = run_config(tmp_path, ckpt, "gpt2")
    cfg["parallel"] = {"pp": 2}
    result = torchrun(2, write_config(cfg, tmp_path / "cfg.yaml"), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    (step1,) = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert math.isclose(step1["loss"], transformers_loss(ckpt, tmp_path / "corpus.txt", "gpt2"), rel_tol=1e-5)


def test_a_resume_prefers_the_runs_own_checkpoint(tmp_path):
    """A run started from init_from and stopped resumes from its own checkpoint, not from init_from again: the
    resumed steps are the uninterrupted run's."""
    ckpt = hf_checkpoint(tmp_path / "hf")
    whole = run_config(tmp_path, ckpt)
    whole["train"]["steps"] = 4
    train(load_config(write_config(whole, tmp_path / "whole.yaml")))
    first = {**whole, "run": {"dir": str(tmp_path / "parts"), "seed": 3}, "checkpoint": {"every": 2}}
    train(load_config(write_config(first, tmp_path / "first.yaml"), ["train.steps=4", "checkpoint.every=2"]))
    shutil.rmtree(tmp_path / "parts" / "checkpoints" / "step_4")  # as if stopped after step 2
    (tmp_path / "parts" / "checkpoints" / "latest").write_text("step_2")
    train(load_config(write_config(first, tmp_path / "first.yaml")))
    starts = [r for r in read_metrics(tmp_path / "parts") if r.get("event") == "start"]
    assert starts[-1]["resumed_from_step"] == 2
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r}
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "parts") if "loss" in r}
    for step in (3, 4):
        assert math.isclose(got[step], expected[step], rel_tol=1e-6), (step, got[step], expected[step])


def test_deepspeed_zero3_starts_from_the_checkpoint(tmp_path):
    """2 ranks, DeepSpeed ZeRO-3 (parameters partitioned as they are built): rank 0 fills each gathered parameter."""
    ckpt = hf_checkpoint(tmp_path / "hf")
    cfg = run_config(tmp_path, ckpt)
    cfg["parallel"] = {"engine": "deepspeed", "zero_stage": 3}
    cfg["train"]["micro_batch"] = 1
    result = torchrun(2, write_config(cfg, tmp_path / "cfg.yaml"), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    (step1,) = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert math.isclose(step1["loss"], transformers_loss(ckpt, tmp_path / "corpus.txt"), rel_tol=1e-5)


def _damage(ckpt: Path, how: str) -> str:
    weights = ckpt / "model.safetensors"
    if how == "missing tensor":
        tensors = load_file(weights)
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, weights, metadata={"format": "pt"})
        return "tensor model.layers.1.mlp.up_proj.weight is missing"
    if how == "unexpected tensor":
        tensors = load_file(weights)
        tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
        save_file(tensors, weights, metadata={"format": "pt"})
        return "tensor model.layers.0.mlp.extra.weight is not part of a llama model"
    if how == "wrong shape":
        tensors = load_file(weights)
        tensors["model.norm.weight"] = torch.zeros(63)
        save_file(tensors, weights, metadata={"format": "pt"})
        return r"tensor model.norm.weight has shape \[63\]"
    if how == "unknown architecture":
        config = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
        return "architectures 'MambaForCausalLM' is not a llama model: no family"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return "model.safetensors is not a readable safetensors file"
    if how == "missing shard":
        tensors = load_file(weights)
        weights.unlink()
        names = sorted(tensors)
        save_file({n: tensors[n] for n in names[:5]}, ckpt / "model-00001-of-00002.safetensors")
        index = {
            n: ("model-00001-of-00002.safetensors" if i < 5 else "model-00002-of-00002.safetensors")
            for i, n in enumerate(names)
        }
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        return "names shard model-00002-of-00002.safetensors, which is missing"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["missing tensor", "unexpected tensor", "wrong shape", "unknown architecture", "truncated", "missing shard"]
)
def test_bad_checkpoints_are_one_line_and_nothing_is_written(how, tmp_path):
    ckpt = hf_checkpoint(tmp_path / "hf")
    expected = _damage(ckpt, how)
    with pytest.raises(UserError, match=expected):
        train(load_config(write_config(run_config(tmp_path, ckpt), tmp_path / "cfg.yaml")))
    assert not (tmp_path / "run").exists()


def test_a_dimension_that_contradicts_the_checkpoint_is_refused(tmp_path):
    ckpt = hf_checkpoint(tmp_path / "hf")
    cfg = run_config(tmp_path, ckpt)
    cfg["model"]["n_layer"] = 3
    with pytest.raises(UserError, match="model.n_layer=3 contradicts model.init_from"):
        train(load_config(write_config(cfg, tmp_path / "cfg.yaml")))


def test_gpt2_vocabulary_trains_under_tp2_and_exports_trimmed(tmp_path):
    """GPT-2's own vocabulary (50257, which no tp > 1 divides) under parallel.tp=2 on 2 gloo ranks (fsdp): the rows
    are padded to 50304 (model.vocab_multiple 128), step 1 has transformers' loss (each rank masks the padding
    columns of its vocab shard: unmasked, their zero logits would join the softmax), the padding rows stay zero, and
    `trainer export` of the `latest` pointer trims them: transformers loads 50257 rows and gives load_model's logits."""
    ckpt = hf_checkpoint(tmp_path / "hf", "gpt2", vocab_size=50257)
    cfg = run_config(tmp_path, ckpt, "gpt2")
    cfg["parallel"] = {"engine": "fsdp", "tp": 2}
    result = torchrun(2, write_config(cfg, tmp_path / "cfg.yaml"), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    start = read_metrics(tmp_path / "run")[0]
    (step1,) = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert (start["tp"], start["vocab_size"], start["padded_vocab_size"]) == (2, 50257, 50304)
    assert "vocabulary 50,257 padded to 50,304 rows" in result.stdout
    assert math.isclose(step1["loss"], transformers_loss(ckpt, tmp_path / "corpus.txt", "gpt2"), rel_tol=1e-5)
    out = tmp_path / "exported"
    exported = run_cli("trainer", "export", str(tmp_path / "run" / "checkpoints" / "latest"), "--out", str(out))
    assert exported.returncode == 0, exported.stderr[-2000:]
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.vocab_size == 50257 and hf.transformer.wte.weight.shape == (50257, 64)
    ours = load_model(tmp_path / "run")
    ids = torch.randint(0, 300, (2, 24))
    assert ours.tok_emb.weight.shape == (50304, 64) and not ours.tok_emb.weight[50257:].any()  # zero, untrained
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)  # 50257 columns both


def test_a_checkpoint_with_fewer_rows_than_its_tokenizer_says_what_is_true(tmp_path, gpt_tok):
    """Issue 32: a checkpoint of 280 token rows with a tokenizer of 300 ids asked to raise model.vocab_size, which
    init_from then refuses. The line states both numbers and asks for a tokenizer that fits; the fix it gives works."""
    ckpt = hf_checkpoint(tmp_path / "hf", "gpt2", vocab_size=280)  # its own tokenizer.json has 300 ids
    with pytest.raises(UserError) as refused:
        train(load_config(write_config(run_config(tmp_path, ckpt, "gpt2"), tmp_path / "cfg.yaml")))
    line = str(refused.value)
    assert "has 280 token rows" in line and "has 300 ids" in line and "own tokenizer.json does not fit" in line
    assert "model.vocab_size" not in line and not (tmp_path / "run").exists()
    # a tokenizer given beside a checkpoint whose own one fits: the line says to use the checkpoint's own
    ckpt = hf_checkpoint(tmp_path / "hf304", "gpt2")
    cfg = run_config(tmp_path, ckpt, "gpt2")
    cfg["data"]["tokenizer"] = str(gpt_tok)  # 512 ids
    with pytest.raises(UserError, match="has 304 token rows .* 512 ids: remove data.tokenizer") as refused:
        train(load_config(write_config(cfg, tmp_path / "cfg.yaml")))
    assert "model.vocab_size" not in str(refused.value)
    del cfg["data"]["tokenizer"]  # as it says
    config = load_config(write_config(cfg, tmp_path / "cfg.yaml"))
    assert resolve_model(config, load_tokenizer(config.data.tokenizer)).vocab_size == 304


def test_tp_pads_a_checkpoint_vocabulary_it_does_not_divide(tmp_path):
    """Issue 32: parallel.tp=2 with a checkpoint of 2049 tokens was refused ("change model.vocab_size (pad it up to a
    multiple)"), and changing it contradicted init_from. The rows are padded instead, before any process starts."""
    cfg = run_config(tmp_path, hf_checkpoint(tmp_path / "hf", vocab_size=2049))
    cfg["parallel"] = {"engine": "fsdp", "tp": 2}
    for override, rows in (([], 2176), (["model.vocab_multiple=1"], 2050)):  # 1: only what tp needs
        config = load_config(write_config(cfg, tmp_path / "cfg.yaml"), override)
        model_cfg = resolve_model(config, load_tokenizer(config.data.tokenizer))
        check_tp_degree(2, model_cfg.tp_divisors(), config.data.seq_len)
        assert (model_cfg.vocab_size, model_cfg.padded_vocab_size) == (2049, rows)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_the_family_comes_from_config_json_when_model_arch_is_unset(kind, tmp_path):
    """Issue 32: init_from of a Llama or Qwen3 folder without model.arch was refused ("is not a gpt model: set
    model.arch=llama") though config.json names the architecture."""
    cfg = run_config(tmp_path, hf_checkpoint(tmp_path / "hf", kind), kind)
    del cfg["model"]["arch"]
    config = load_config(write_config(cfg, tmp_path / "cfg.yaml"))
    assert config.model.arch == "llama"
    model_cfg = resolve_model(config, load_tokenizer(config.data.tokenizer))
    assert (model_cfg.arch, model_cfg.qk_norm) == ("llama", kind == "qwen3")


def test_only_a_real_contradiction_of_the_architecture_is_refused(tmp_path):
    """model.arch=gpt given with a Llama folder is refused, naming the family; an architecture no family reads,
    with model.arch unset, names the ones they read."""
    ckpt = hf_checkpoint(tmp_path / "hf")
    with pytest.raises(UserError, match="'LlamaForCausalLM' is not a gpt model: set model.arch=llama"):
        train(load_config(write_config(run_config(tmp_path, ckpt, "gpt2"), tmp_path / "cfg.yaml")))
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
    cfg = run_config(tmp_path, ckpt)
    del cfg["model"]["arch"]
    with pytest.raises(UserError, match="'MambaForCausalLM' is not a model any family .* llama: LlamaForCausalLM"):
        load_config(write_config(cfg, tmp_path / "cfg.yaml"))
