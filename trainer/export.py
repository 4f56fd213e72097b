"""Write a trained model in the Hugging Face layout: config.json + model.safetensors (+ tokenizer.json).

The result loads with `transformers.GPT2LMHeadModel.from_pretrained(dir)` or `BertForMaskedLM.from_pretrained(dir)`
and gives the same logits. Tied weights are stored once, under the name Hugging Face's own save keeps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from trainer.errors import UserError
from trainer.models.presets import ModelConfig

INITIALIZER_RANGE = 0.02
# Wrapper prefixes that torch.compile / checkpoint_wrapper add to state_dict keys.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.")
_SPECIAL_KEYS = ("bos", "eos", "pad")


def export_hf(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer_json: str | Path | None = None,
    special_token_ids: dict | None = None,
) -> Path:
    """Export a GPT or BERT model of this package to `out_dir` in the Hugging Face layout; returns `out_dir`.

    special_token_ids: optional {"bos"|"eos"|"pad" (or "eos_id", "eos_token_id", ...): id}; those given go into
    config.json (for GPT, bos defaults to eos as in GPT-2); other keys (e.g. "mask_id") are ignored since config.json
    has no field for them.
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise UserError(f"cannot export {type(model).__name__}: it has no ModelConfig; export a model from build_model")
    state = _plain_state_dict(model)
    if cfg.arch == "gpt":
        tensors, config = _gpt_tensors(state, cfg), _gpt_config(cfg)
    else:
        tensors, config = _bert_tensors(state, cfg), _bert_config(cfg)
    config.update(_special_ids(special_token_ids, cfg.arch))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer_json is not None:
        src = Path(tokenizer_json)
        if not src.is_file():
            raise UserError(
                f"tokenizer file {src} does not exist; pass the tokenizer.json written by `trainer tokenizer`"
            )
        shutil.copyfile(src, out / "tokenizer.json")
    return out


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        state[name] = tensor
    return state


def _special_ids(special_token_ids: dict | None, arch: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in (special_token_ids or {}).items():
        short = key.removesuffix("_token_id").removesuffix("_id")
        if short in _SPECIAL_KEYS and value is not None:
            out[f"{short}_token_id"] = int(value)
    if arch == "gpt" and "eos_token_id" in out:
        out.setdefault("bos_token_id", out["eos_token_id"])  # GPT-2 convention: one end-of-text token for both
    return out


def _gpt_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.d_ff,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": INITIALIZER_RANGE,
        "tie_word_embeddings": True,
        # GPT2Config defaults these to 50256, which is out of range for our vocabularies; set when known.
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _bert_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.d_ff,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "initializer_range": INITIALIZER_RANGE,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "pad_token_id": None,
    }


def _gpt_tensors(s: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 uses Conv1D, whose weight is (in, out): our Linear weights are transposed and q/k/v fused."""
    out = {
        "transformer.wte.weight": s["tok_emb.weight"],  # lm_head.weight is tied to it and not stored, as HF does
        "transformer.wpe.weight": s["pos_emb.weight"],
        "transformer.ln_f.weight": s["ln_f.weight"],
        "transformer.ln_f.bias": s["ln_f.bias"],
    }
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[hf + f"{ln}.weight"] = s[ours + f"{ln}.weight"]
            out[hf + f"{ln}.bias"] = s[ours + f"{ln}.bias"]
        qkv = ("attn.wq", "attn.wk", "attn.wv")
        out[hf + "attn.c_attn.weight"] = torch.cat([s[ours + f"{n}.weight"] for n in qkv], dim=0).t()
        out[hf + "attn.c_attn.bias"] = torch.cat([s[ours + f"{n}.bias"] for n in qkv], dim=0)
        for ours_name, hf_name in (("attn.wo", "attn.c_proj"), ("mlp.fc_in", "mlp.c_fc"), ("mlp.fc_out", "mlp.c_proj")):
            out[hf + f"{hf_name}.weight"] = s[ours + f"{ours_name}.weight"].t()
            out[hf + f"{hf_name}.bias"] = s[ours + f"{ours_name}.bias"]
    return out


def _bert_tensors(s: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF BERT uses nn.Linear, so weights map one to one; the tied decoder weight and bias are not stored."""
    out = {
        "bert.embeddings.word_embeddings.weight": s["tok_emb.weight"],
        "bert.embeddings.position_embeddings.weight": s["pos_emb.weight"],
        "bert.embeddings.token_type_embeddings.weight": s["type_emb.weight"],
        "bert.embeddings.LayerNorm.weight": s["ln_emb.weight"],
        "bert.embeddings.LayerNorm.bias": s["ln_emb.bias"],
        "cls.predictions.transform.dense.weight": s["head.dense.weight"],
        "cls.predictions.transform.dense.bias": s["head.dense.bias"],
        "cls.predictions.transform.LayerNorm.weight": s["head.ln.weight"],
        "cls.predictions.transform.LayerNorm.bias": s["head.ln.bias"],
        "cls.predictions.bias": s["lm_head.bias"],  # HF ties cls.predictions.decoder.bias to this one
    }
    names = {
        "attn.wq": "attention.self.query",
        "attn.wk": "attention.self.key",
        "attn.wv": "attention.self.value",
        "attn.wo": "attention.output.dense",
        "ln_attn": "attention.output.LayerNorm",
        "mlp.fc_in": "intermediate.dense",
        "mlp.fc_out": "output.dense",
        "ln_mlp": "output.LayerNorm",
    }
    for i in range(cfg.n_layer):
        for ours_name, hf_name in names.items():
            for kind in ("weight", "bias"):
                out[f"bert.encoder.layer.{i}.{hf_name}.{kind}"] = s[f"blocks.{i}.{ours_name}.{kind}"]
    return out
