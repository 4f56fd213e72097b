"""Write a trained model in the Hugging Face layout of its family: config.json + model.safetensors (+ tokenizer.json).

The result loads with the family's transformers class (GPT2LMHeadModel, BertForMaskedLM, LlamaForCausalLM,
Qwen3ForCausalLM) and gives the same logits. Tied weights are stored once, under the name Hugging Face's own save keeps.
The names come from the family's adapter table (trainer/models/<family>/hf.py), which `model.init_from` reads too.
A padded vocabulary (model.vocab_multiple) is trimmed back to vocab_size rows: the padding rows are no token.
The output directory must be new or empty: files of another model left beside the new ones (shards, an index, a
generation_config.json) would be loaded with them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from trainer.errors import UserError
from trainer.models import ModelConfig, family
from trainer.models.hf import CONFIG_FILE, WEIGHTS_FILE, to_hf
from trainer.parallel import unwrapped


def export_hf(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer_json: str | Path | None = None,
    special_token_ids: dict | None = None,
) -> Path:
    """Export a model of this package to `out_dir` in its family's Hugging Face layout; returns `out_dir`.

    special_token_ids: optional {"bos"|"eos"|"pad" (or "eos_id", "eos_token_id", ...): id}; those given go into
    config.json (for GPT, bos defaults to eos as in GPT-2); other keys (e.g. "mask_id") are ignored since config.json
    has no field for them.
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise UserError(f"cannot export {type(model).__name__}: it has no ModelConfig; export a model from build_model")
    if tokenizer_json is not None and not Path(tokenizer_json).is_file():
        raise UserError(
            f"tokenizer file {tokenizer_json} does not exist; pass the tokenizer.json written by `trainer tokenizer`"
        )
    out = Path(out_dir)
    check_out_dir(out)
    adapter = family(cfg.arch).adapter
    tensors = to_hf(plain_state_dict(model), cfg, adapter)
    config = adapter.config_to_hf(cfg)
    config.update(adapter.special_ids(special_token_ids or {}))

    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    return out


def check_out_dir(out: str | Path) -> None:
    """Refuses (one line) an export directory that holds anything: another model's shards, index or
    generation_config.json would sit beside the new files and transformers would load a mix of the two."""
    out = Path(out)
    if not out.is_dir():
        return
    held = sorted(p.name for p in out.iterdir())
    if held:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise UserError(
            f"--out {out} is not empty (it holds {shown}): export into a new or empty directory, or remove {out} "
            f"first to replace what it holds"
        )


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the model's own names (without compile / checkpoint wrapper parts)."""
    return {unwrapped(name): tensor for name, tensor in model.state_dict().items()}
