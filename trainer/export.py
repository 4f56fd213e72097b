"""Write a trained model in the Hugging Face layout of its family: config.json + model.safetensors (+ tokenizer.json).

The result loads with the family's transformers class (GPT2LMHeadModel, BertForMaskedLM, LlamaForCausalLM,
Qwen3ForCausalLM) and gives the same logits. Tied weights are stored once, under the name Hugging Face's own save keeps.
The names come from the family's adapter table (trainer/models/<family>/hf.py), which `model.init_from` reads too.
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
    adapter = family(cfg.arch).adapter
    tensors = to_hf(plain_state_dict(model), cfg, adapter)
    config = adapter.config_to_hf(cfg)
    config.update(adapter.special_ids(special_token_ids or {}))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer_json is not None:
        src = Path(tokenizer_json)
        if not src.is_file():
            raise UserError(
                f"tokenizer file {src} does not exist; pass the tokenizer.json written by `trainer tokenizer`"
            )
        shutil.copyfile(src, out / "tokenizer.json")
    return out


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the model's own names (without compile / checkpoint wrapper parts)."""
    return {unwrapped(name): tensor for name, tensor in model.state_dict().items()}
