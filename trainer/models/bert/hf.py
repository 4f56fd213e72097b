"""BERT <-> Hugging Face BertForMaskedLM: names, config keys. Linear layers map one to one; the tied decoder weight
and its bias (tied to `cls.predictions.bias`) are not stored twice. No pooler, as BertForMaskedLM."""

from __future__ import annotations

from trainer.models.bert.config import BERTConfig
from trainer.models.hf import Adapter, Entry, special_token_ids

INITIALIZER_RANGE = 0.02
_BLOCK = {
    "attn.wq": "attention.self.query",
    "attn.wk": "attention.self.key",
    "attn.wv": "attention.self.value",
    "attn.wo": "attention.output.dense",
    "ln_attn": "attention.output.LayerNorm",
    "mlp.fc_in": "intermediate.dense",
    "mlp.fc_out": "output.dense",
    "ln_mlp": "output.LayerNorm",
}
_TOP = {
    "tok_emb.weight": "bert.embeddings.word_embeddings.weight",
    "pos_emb.weight": "bert.embeddings.position_embeddings.weight",
    "type_emb.weight": "bert.embeddings.token_type_embeddings.weight",
    "ln_emb.weight": "bert.embeddings.LayerNorm.weight",
    "ln_emb.bias": "bert.embeddings.LayerNorm.bias",
    "head.dense.weight": "cls.predictions.transform.dense.weight",
    "head.dense.bias": "cls.predictions.transform.dense.bias",
    "head.ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "head.ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "lm_head.bias": "cls.predictions.bias",
}
_VOCAB_ROWS = ("tok_emb.weight", "lm_head.bias")  # the word embedding (the tied decoder) and the decoder's bias
TABLE = [
    *[Entry(hf, (ours,), vocab_rows=ours in _VOCAB_ROWS) for ours, hf in _TOP.items()],
    *[
        Entry(f"bert.encoder.layer.{{i}}.{hf}.{k}", (f"blocks.{{i}}.{ours}.{k}",))
        for ours, hf in _BLOCK.items()
        for k in ("weight", "bias")
    ],
]


def config_to_hf(cfg: BERTConfig) -> dict:
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


def config_from_hf(c: dict) -> dict:
    return {
        "n_layer": c["num_hidden_layers"],
        "n_head": c["num_attention_heads"],
        "d_model": c["hidden_size"],
        "d_ff": c["intermediate_size"],
        "vocab_size": c["vocab_size"],
        "max_seq_len": c["max_position_embeddings"],
        "type_vocab_size": c.get("type_vocab_size", 2),
        "layer_norm_eps": c.get("layer_norm_eps", 1e-12),
    }


ADAPTER = Adapter(("BertForMaskedLM",), config_to_hf, config_from_hf, lambda cfg: TABLE, special_token_ids)
