"""Model shapes, parameter counts against the published sizes and transformers, causality, and input errors."""

from __future__ import annotations

import pytest
import torch
import transformers

from trainer.errors import UserError
from trainer.models import (
    all_presets,
    build_model,
    config_from_dict,
    count_params,
    model_from_config,
    resolve_model_config,
)
from trainer.models.bert.config import BERTConfig

PRESETS = all_presets()


def _meta_count(arch: str, preset: str, **dims: object) -> int:
    with torch.device("meta"):
        return count_params(build_model(arch, preset, **dims))


def _hf_count(model_cls: type, config: object) -> int:
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once


def test_published_parameter_counts() -> None:
    assert _meta_count("gpt", "gpt2-small") == 124_439_808
    assert _meta_count("bert", "bert-base") == 109_514_298


@pytest.mark.parametrize("preset", ["gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_gpt_presets_match_transformers(preset: str) -> None:
    cfg = PRESETS[preset]
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
    )
    assert _meta_count("gpt", preset) == _hf_count(transformers.GPT2LMHeadModel, hf_cfg)


def test_bert_large_matches_transformers() -> None:
    cfg = PRESETS["bert-large"]
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len,
    )
    assert _meta_count("bert", "bert-large") == _hf_count(transformers.BertForMaskedLM, hf_cfg)


def test_count_params_excludes_embeddings_once() -> None:
    model = build_model("gpt", "gpt-tiny")
    cfg = model.config
    assert model.lm_head.weight is model.tok_emb.weight
    embeddings = (cfg.vocab_size + cfg.max_seq_len) * cfg.d_model
    assert count_params(model) - count_params(model, exclude_embeddings=True) == embeddings
    bert = build_model("bert", "bert-tiny")
    bert_emb = (bert.config.vocab_size + bert.config.max_seq_len + bert.config.type_vocab_size) * bert.config.d_model
    assert count_params(bert) - count_params(bert, exclude_embeddings=True) == bert_emb


def test_gpt_forward_shape_and_causality() -> None:
    torch.manual_seed(0)
    model = build_model("gpt", "gpt-tiny", vocab_size=97, max_seq_len=16).eval()
    ids = torch.randint(0, 97, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, 97)
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 97
    logits2 = model(changed)
    torch.testing.assert_close(logits[:, :8], logits2[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, 8:], logits2[:, 8:])


def test_bert_forward_shape_is_bidirectional_and_masks_padding() -> None:
    torch.manual_seed(0)
    model = build_model("bert", "bert-tiny", vocab_size=101, max_seq_len=16).eval()
    ids = torch.randint(0, 101, (2, 10))
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    logits = model(ids, token_type_ids=types)
    assert logits.shape == (2, 10, 101)
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 101
    assert not torch.allclose(model(changed, token_type_ids=types)[:, 0], logits[:, 0])  # sees later tokens
    # With the last token masked out as padding, changing it changes no other position's logits.
    mask = torch.ones_like(ids)
    mask[:, 9] = 0
    a = model(ids, token_type_ids=types, attention_mask=mask)
    b = model(changed, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)


def test_dropout_and_training_backward() -> None:
    torch.manual_seed(0)
    for arch in ("gpt", "bert"):
        model = build_model(arch, f"{arch}-tiny", vocab_size=64, max_seq_len=16, dropout=0.1).train()
        ids = torch.randint(0, 64, (2, 8))
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        assert model.tok_emb.weight.grad is not None
        assert all(p.grad is not None for p in model.parameters())


def test_generate_crops_context_and_is_reproducible() -> None:
    torch.manual_seed(0)
    model = build_model("gpt", "gpt-tiny", vocab_size=50, max_seq_len=8).eval()
    prompt = torch.randint(0, 50, (2, 6))
    out1 = model.generate(prompt, 5, top_k=5, generator=torch.Generator().manual_seed(1))
    out2 = model.generate(prompt, 5, top_k=5, generator=torch.Generator().manual_seed(1))
    assert out1.shape == (2, 11)
    assert torch.equal(out1, out2) and torch.equal(out1[:, :6], prompt)
    greedy = model.generate(prompt, 3, temperature=0.0)
    assert torch.equal(greedy[:, 6], model(prompt)[:, -1].argmax(-1))


def test_sequence_longer_than_context_is_a_user_error() -> None:
    for arch in ("gpt", "bert"):
        model = build_model(arch, f"{arch}-tiny", max_seq_len=8)
        with pytest.raises(UserError, match="max_seq_len=8"):
            model(torch.zeros(1, 9, dtype=torch.long))


def test_unknown_preset_names_the_closest() -> None:
    with pytest.raises(UserError, match="'gpt2-small'"):
        resolve_model_config("gpt", "gpt2-smal")
    with pytest.raises(UserError, match="'bert-base'"):
        build_model("bert", "bert-bse")


def test_preset_of_other_arch_and_bad_dims_are_user_errors() -> None:
    with pytest.raises(UserError, match="bert preset"):
        resolve_model_config("gpt", "bert-base")
    with pytest.raises(UserError, match="not divisible"):
        resolve_model_config("gpt", "gpt-tiny", n_head=3)
    with pytest.raises(UserError, match="n_laye"):
        resolve_model_config("gpt", "gpt-tiny", n_laye=3)
    with pytest.raises(UserError, match="model.arch"):
        resolve_model_config("mamba", "gpt-tiny")
    with pytest.raises(UserError, match="gpt preset"):
        resolve_model_config("llama", "gpt-tiny")
    with pytest.raises(UserError, match="not a gpt setting"):
        resolve_model_config("gpt", "gpt-tiny", type_vocab_size=3)
    with pytest.raises(UserError, match="not set"):
        resolve_model_config("gpt", None, n_layer=2)


def test_overrides_and_defaults() -> None:
    cfg = resolve_model_config("gpt", "gpt2-small", n_layer=2, d_model=128, n_head=4, vocab_size=None)
    assert (cfg.n_layer, cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.max_seq_len) == (2, 128, 512, 50257, 1024)
    assert cfg.layer_norm_eps == 1e-5
    bert = BERTConfig(1, 1, 8, 10, 4)
    assert bert.d_ff == 32 and bert.layer_norm_eps == 1e-12
    assert isinstance(model_from_config(bert), torch.nn.Module)
    assert config_from_dict(bert.to_dict()) == bert


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_meta_build_then_init_weights_reties(arch: str) -> None:
    with torch.device("meta"):
        model = build_model(arch, f"{arch}-tiny")
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.tok_emb.weight
    assert count_params(model) == count_params(build_model(arch, f"{arch}-tiny"))
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_blocks_work_under_checkpoint_wrapper(arch: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = build_model(arch, f"{arch}-tiny", vocab_size=64, max_seq_len=16)
    wrapped = build_model(arch, f"{arch}-tiny", vocab_size=64, max_seq_len=16)
    wrapped.load_state_dict(model.state_dict())
    for i, block in wrapped.blocks.items():
        wrapped.blocks[i] = checkpoint_wrapper(block)
    ids = torch.randint(0, 64, (2, 8))
    kwargs = {"attention_mask": torch.ones_like(ids)} if arch == "bert" else {}
    model(ids, **kwargs).square().mean().backward()
    wrapped(ids, **kwargs).square().mean().backward()
    torch.testing.assert_close(wrapped.tok_emb.weight.grad, model.tok_emb.weight.grad)


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """`fn()` and the bytes of the tensors autograd saves for backward while it runs its forward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_chunked_head_loss_matches_whole_and_saves_less(arch: str, compiled: bool) -> None:
    """Full activation checkpointing computes the head and loss in checkpointed chunks of tokens: the same loss and
    gradients of every parameter as the whole (tokens x vocab) product, ignored targets included, and far less saved
    for backward than the fp32 logits (the chunks keep only their inputs)."""
    from trainer.parallel import ParallelDims, parallelize

    torch.manual_seed(0)
    vocab, b, t = 4096, 2, 64
    whole = build_model(arch, f"{arch}-tiny", vocab_size=vocab, max_seq_len=t)
    chunked = build_model(arch, f"{arch}-tiny", vocab_size=vocab, max_seq_len=t)
    chunked.load_state_dict(whole.state_dict())
    parallelize(chunked, ParallelDims(world_size=1, rank=0, local_rank=0, dp=1), "full", compile=compiled)
    assert chunked.loss_chunk_rows == 2048  # 2**23 / 4096: 2 chunks of the 128 tokens would not show the ragged end
    chunked.loss_chunk_rows = 48  # 128 tokens: chunks of 48, 48 and 32
    if compiled:
        whole.output = torch.compile(whole.output)
    ids = torch.randint(0, vocab, (b, t))
    labels = torch.randint(0, vocab, (b, t))
    labels[0, :20] = -100
    labels[1, -7:] = -100
    kwargs = {"attention_mask": torch.ones_like(ids)} if arch == "bert" else {}
    loss_w, saved_w = _saved_bytes(lambda: whole(ids, labels=labels, **kwargs))
    loss_c, saved_c = _saved_bytes(lambda: chunked(ids, labels=labels, **kwargs))
    loss_w.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_w, rtol=1e-5, atol=1e-4)
    grads_w = dict(whole.named_parameters())
    for name, p in chunked.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        ref = grads_w[name].grad  # bias grads sum 128 tokens: fp32 roundoff scales with the tensor's largest entry
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6 * max(1.0, ref.abs().max().item()), msg=name)
    if not compiled:  # compiled graphs save what the partitioner chose, not through these hooks
        logits_bytes = b * t * vocab * 4
        assert saved_w - saved_c > 0.9 * logits_bytes, (saved_w, saved_c, logits_bytes)
