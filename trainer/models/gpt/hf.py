"""GPT-2 <-> Hugging Face GPT2LMHeadModel: names, config keys. Its Conv1D layers keep weights as (in, out), and q/k/v
are one fused `c_attn`. The LM head is tied to `wte` and not stored, as Hugging Face saves it."""

from __future__ import annotations

from trainer.models.gpt.config import GPTConfig
from trainer.models.hf import Adapter, Entry, special_token_ids

INITIALIZER_RANGE = 0.02

TABLE = [
    Entry("transformer.wte.weight", ("tok_emb.weight",), vocab_rows=True),
    Entry("transformer.wpe.weight", ("pos_emb.weight",)),
    Entry("transformer.ln_f.weight", ("ln_f.weight",)),
    Entry("transformer.ln_f.bias", ("ln_f.bias",)),
    *[
        Entry(f"transformer.h.{{i}}.{ln}.{k}", (f"blocks.{{i}}.{ln}.{k}",))
        for ln in ("ln_1", "ln_2")
        for k in ("weight", "bias")
    ],
    Entry("transformer.h.{i}.attn.c_attn.weight", tuple(f"blocks.{{i}}.attn.w{x}.weight" for x in "qkv"), "cat_t"),
    Entry("transformer.h.{i}.attn.c_attn.bias", tuple(f"blocks.{{i}}.attn.w{x}.bias" for x in "qkv"), "cat"),
    *[
        e
        for ours, hf in (("attn.wo", "attn.c_proj"), ("mlp.fc_in", "mlp.c_fc"), ("mlp.fc_out", "mlp.c_proj"))
        for e in (
            Entry(f"transformer.h.{{i}}.{hf}.weight", (f"blocks.{{i}}.{ours}.weight",), "t"),
            Entry(f"transformer.h.{{i}}.{hf}.bias", (f"blocks.{{i}}.{ours}.bias",)),
        )
    ],
]


def config_to_hf(cfg: GPTConfig) -> dict:
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


def config_from_hf(c: dict) -> dict:
    return {
        "n_layer": c["n_layer"],
        "n_head": c["n_head"],
        "d_model": c["n_embd"],
        "d_ff": c.get("n_inner") or 4 * c["n_embd"],
        "vocab_size": c["vocab_size"],
        "max_seq_len": c["n_positions"],
        "layer_norm_eps": c.get("layer_norm_epsilon", 1e-5),
    }


def special_ids(ids: dict) -> dict:
    out = special_token_ids(ids)
    if "eos_token_id" in out:
        out.setdefault("bos_token_id", out["eos_token_id"])  # GPT-2 convention: one end-of-text token for both
    return out


ADAPTER = Adapter(("GPT2LMHeadModel",), config_to_hf, config_from_hf, lambda cfg: TABLE, special_ids)
