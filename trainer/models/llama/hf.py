"""Llama family <-> Hugging Face LlamaForCausalLM (and Qwen3ForCausalLM when QK-norm is on): names and config keys.
Every tensor maps one to one (nn.Linear both sides), so a rank can read just its slice of each. A tied LM head is not
stored, as Hugging Face saves it."""

from __future__ import annotations

from trainer.errors import UserError
from trainer.models.hf import Adapter, Entry, special_token_ids
from trainer.models.llama.config import ROPE_SCALING_KEYS, LlamaConfig

INITIALIZER_RANGE = 0.02
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_QK_NORM = {"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}


def table(cfg: LlamaConfig) -> list[Entry]:
    block = {**_BLOCK, **(_QK_NORM if cfg.qk_norm else {})}
    entries = [
        Entry("model.embed_tokens.weight", ("tok_emb.weight",), vocab_rows=True),
        *[Entry(f"model.layers.{{i}}.{hf}", (f"blocks.{{i}}.{ours}",)) for ours, hf in block.items()],
        Entry("model.norm.weight", ("norm.weight",)),
    ]
    if not cfg.tie_embeddings:
        entries.append(Entry("lm_head.weight", ("lm_head.weight",), vocab_rows=True))
    return entries


def config_to_hf(cfg: LlamaConfig) -> dict:
    qwen3 = cfg.qk_norm
    out = {
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "LlamaForCausalLM"],
        "model_type": "qwen3" if qwen3 else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {"rope_type": "llama3", **cfg.rope_scaling} if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": cfg.dropout,
        "initializer_range": INITIALIZER_RANGE,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if not qwen3:
        out["mlp_bias"] = False
    else:
        out["use_sliding_window"] = False
    return out


def config_from_hf(c: dict) -> dict:
    arch = (c.get("architectures") or ["LlamaForCausalLM"])[0]
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise UserError(f"{arch} with attention_bias or mlp_bias is not a model the llama family reads (no biases)")
    rope = dict(c.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
    scaling = rope or dict(c.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind not in ("default", "llama3"):
        raise UserError(f"rope type {kind!r} of this {arch} is not one the llama family implements (default, llama3)")
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    return {
        "n_layer": c["num_hidden_layers"],
        "n_head": heads,
        "n_kv_heads": c.get("num_key_value_heads") or heads,
        "d_model": hidden,
        "head_dim": c.get("head_dim") or hidden // heads,
        "d_ff": c["intermediate_size"],
        "vocab_size": c["vocab_size"],
        "max_seq_len": c["max_position_embeddings"],
        "rope_theta": float(theta),
        "rope_scaling": {k: scaling[k] for k in ROPE_SCALING_KEYS} if kind == "llama3" else None,
        "norm_eps": c.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "qk_norm": arch == "Qwen3ForCausalLM",
    }


ADAPTER = Adapter(("LlamaForCausalLM", "Qwen3ForCausalLM"), config_to_hf, config_from_hf, table, special_token_ids)
