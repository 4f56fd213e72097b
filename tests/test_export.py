"""Export to the Hugging Face layout: transformers loads the files and reproduces our logits exactly (fp32); a padded
vocabulary is trimmed back; the output directory must not hold another model; `latest` is followed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from trainer.errors import UserError
from trainer.export import export_hf
from trainer.models import build_model

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter off its init (LayerNorm 1/0, biases 0) so a swapped or missing mapping shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _stored_names(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        return list(f.keys())


def test_gpt_export_loads_in_transformers_with_same_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _perturb(build_model("gpt", "gpt-tiny", vocab_size=211, max_seq_len=32, d_ff=96), seed=1)
    tok = tmp_path / "src_tokenizer.json"
    tok.write_text('{"version": "1.0"}')
    out = export_hf(model, tmp_path / "hf", tokenizer_json=tok, special_token_ids={"eos": 3, "bos_token_id": 2})

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_inner"], config["eos_token_id"], config["bos_token_id"]) == (96, 3, 2)
    assert (out / "tokenizer.json").read_text() == tok.read_text()
    names = _stored_names(out)
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # tied tensor stored once
    assert len(names) == len(set(names))

    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, 211, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=ATOL)


def test_bert_export_loads_in_transformers_with_same_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _perturb(build_model("bert", "bert-tiny", vocab_size=199, max_seq_len=24, type_vocab_size=3), seed=2)
    out = export_hf(model, tmp_path / "hf", special_token_ids={"pad_id": 0, "mask_id": 4, "eos_id": None})

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForMaskedLM"]
    assert (config["type_vocab_size"], config["pad_token_id"], config["hidden_act"]) == (3, 0, "gelu")
    assert "mask_token_id" not in config and config.get("eos_token_id") is None
    names = _stored_names(out)
    assert "cls.predictions.bias" in names
    assert not {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} & set(names)
    assert len(names) == len(set(names))

    hf, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 199, (2, 20))
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    types[1, 15:] = 2
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # second sequence padded
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=ATOL)
        ours = model(ids, token_type_ids=types, attention_mask=mask)
        theirs = hf(ids, token_type_ids=types, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)


def test_export_needs_a_model_of_this_package(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ModelConfig"):
        export_hf(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(UserError, match="tokenizer"):
        export_hf(build_model("gpt", "gpt-tiny"), tmp_path, tokenizer_json=tmp_path / "missing.json")


def test_export_strips_checkpoint_wrapper_prefixes(tmp_path: Path) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = _perturb(build_model("gpt", "gpt-tiny", vocab_size=64, max_seq_len=16), seed=3)
    for i, block in model.blocks.items():
        model.blocks[i] = checkpoint_wrapper(block)
    out = export_hf(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=ATOL)


def test_gpt_bos_defaults_to_eos(tmp_path: Path) -> None:
    out = export_hf(build_model("gpt", "gpt-tiny"), tmp_path, special_token_ids={"eos_id": 5, "unk_id": 1})
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (5, 5) and "unk_token_id" not in config


def test_llama_run_exports_through_the_cli_and_generates_in_transformers(tmp_path, corpus, gpt_tok):
    """`trainer export` of a Llama run: LlamaForCausalLM loads it with no missing or unexpected tensors, gives
    load_model's logits, and `generate` runs from the exported tokenizer (end-of-text id in config.json)."""
    from conftest import run_cli, tiny_config, write_config

    from trainer.checkpoint import load_model

    overrides = {
        "model.arch": "llama",
        "model.n_head": 4,
        "model.n_kv_heads": 2,
        "train.steps": 2,
        "checkpoint.every": 2,
    }
    cfg = write_config(tiny_config(tmp_path / "run", corpus, gpt_tok, **overrides), tmp_path / "c.yaml")
    assert run_cli("trainer", "train", str(cfg)).returncode == 0
    r = run_cli("trainer", "export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-2000:]
    hf, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = load_model(tmp_path / "run")
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    prompt = tokenizer("To be, or not to be", return_tensors="pt")
    out = hf.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=hf.config.eos_token_id)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert isinstance(tokenizer.decode(out[0]), str) and hf.config.eos_token_id is not None


LEGACY_GPT = Path(__file__).parent / "fixtures" / "legacy" / "gpt"  # a complete checkpoint, step_2 of a tiny GPT


def test_export_refuses_a_directory_holding_another_model(tmp_path: Path) -> None:
    """Issue 32: export into a directory holding another model left its shards, index and generation_config.json
    beside the new files (transformers then loads a mix). It is refused in one line and nothing there changes."""
    from conftest import run_cli

    out = tmp_path / "hf"
    export_hf(build_model("llama", "llama-tiny"), out)
    (out / "generation_config.json").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_cli("trainer", "export", str(LEGACY_GPT / "step_2"), "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "is not empty" in r.stderr
    assert "config.json, generation_config.json, model.safetensors" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(UserError, match="is not empty"):
        export_hf(build_model("gpt", "gpt-tiny"), out)
    (tmp_path / "empty").mkdir()  # an empty directory is a place to export to
    assert export_hf(build_model("gpt", "gpt-tiny"), tmp_path / "empty") == tmp_path / "empty"


def test_export_follows_the_latest_pointer(tmp_path: Path) -> None:
    """Issue 32: `trainer export RUN/checkpoints/latest` said "no complete checkpoint"; `latest` is the pointer to
    the newest complete checkpoint, so export (and load_model) take the checkpoint it names."""
    from conftest import run_cli

    from trainer.checkpoint import load_model

    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(LEGACY_GPT / "step_2", checkpoints / "step_2")
    (checkpoints / "latest").write_text("step_2")
    r = run_cli("trainer", "export", str(checkpoints / "latest"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"exported {checkpoints / 'step_2'} to" in r.stdout
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_model(checkpoints / "latest")(ids), rtol=0, atol=ATOL)
