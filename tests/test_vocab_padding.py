"""Vocabulary padding (model.vocab_multiple): the padding rows of the embedding and head never win - the loss is an
unpadded model's with the same weights, no gradient reaches them, sampling never emits a padding id - the padded
size a run picks, and checkpoints saved before padding existed load without any. (GPT-2's 50257 tokens under tp=2,
masked on each vocab shard, is in test_init_from.py.)"""

from pathlib import Path

import pytest
import torch

from trainer.checkpoint import load_model
from trainer.errors import UserError
from trainer.evaluate import generate_sample
from trainer.models import build_model
from trainer.models.registry import run_vocab_multiple

VOCAB, ROWS = 300, 384  # 300 tokens padded to a multiple of 128
LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def padded_and_plain(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same model twice, with 384 rows and with 300; the padded one's extra rows (and BERT's decoder bias there)
    are large, so that unmasked they would take every softmax and every argmax."""
    torch.manual_seed(0)
    padded = build_model(arch, f"{arch}-tiny", vocab_size=VOCAB, vocab_multiple=128, max_seq_len=32)
    plain = build_model(arch, f"{arch}-tiny", vocab_size=VOCAB, max_seq_len=32)
    assert (padded.config.padded_vocab_size, plain.config.padded_vocab_size) == (ROWS, VOCAB)
    with torch.no_grad():
        for name, p in padded.named_parameters():
            if p.shape[0] == ROWS:
                p[VOCAB:] = 30.0 * torch.randn_like(p[VOCAB:]) + (100.0 if p.dim() == 1 else 0.0)
    plain.load_state_dict({k: v[:VOCAB] if v.shape[:1] == (ROWS,) else v for k, v in padded.state_dict().items()})
    return padded.eval(), plain.eval()


@pytest.mark.parametrize("arch", ["gpt", "llama", "bert"])
def test_padding_rows_never_change_the_loss_or_get_a_gradient(arch):
    padded, plain = padded_and_plain(arch)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, ::3] = -100
    with torch.no_grad():
        logits = padded(ids)
        assert logits.shape == (2, 32, VOCAB)  # the padding rows are never projected
        torch.testing.assert_close(logits, plain(ids), rtol=0, atol=1e-5)
    loss = padded(ids, labels=labels)
    torch.testing.assert_close(loss, plain(ids, labels=labels), rtol=1e-6, atol=0)
    loss.backward()
    for name, p in padded.named_parameters():
        if p.shape[0] == ROWS:
            assert not p.grad[VOCAB:].any(), name  # nothing flows back to the padding rows
    padded.loss_chunk_rows = 16  # the head and loss in checkpointed chunks (activation_checkpointing=full)
    torch.testing.assert_close(padded(ids, labels=labels), loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_sampling_never_emits_a_padding_id(arch):
    padded, _ = padded_and_plain(arch)
    prompt = torch.randint(0, VOCAB, (4, 4), generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    for temperature, top_k in ((0.0, None), (1.0, None), (2.0, 50), (1.0, ROWS)) if arch == "gpt" else ():
        out = padded.generate(prompt, 24, temperature=temperature, top_k=top_k, generator=gen)  # GPT's own sampler
        assert out.max() < VOCAB, (temperature, top_k)
    # the sample a run logs at each evaluation (the model stands in for the engine: train() and forward())
    ids = generate_sample(padded, prompt[0].tolist(), 24, device=torch.device("cpu"), seed=4, context=32, tp=1)
    assert max(ids) < VOCAB


def test_the_padded_size_a_run_picks():
    assert run_vocab_multiple(None, None, 1, 50257) == 128  # a new run: Megatron's default 128 -> 50304 rows
    assert run_vocab_multiple(None, None, 8, 50257) == 128  # every power-of-two tp up to 128: the same rows
    assert run_vocab_multiple(None, None, 3, 50257) == 128  # 50304 = 3 x 16768: split already
    assert run_vocab_multiple(None, None, 5, 50257) == 640  # 128 x 5 (50560 rows): tp splits the rows evenly
    assert run_vocab_multiple(1, None, 2, 50257) == 2  # none asked for, but tp must split them
    assert run_vocab_multiple(1, None, 2, 300) == 1  # 300 rows split already
    assert run_vocab_multiple(None, 1, 2, 300) == 1  # a resumed checkpoint (saved before padding) keeps its rows
    assert run_vocab_multiple(None, 128, 4, 50257) == 128  # ... at another tp degree
    with pytest.raises(UserError, match="has 50257 vocabulary rows .* parallel.tp=2 does not split evenly"):
        run_vocab_multiple(None, 1, 2, 50257)
    with pytest.raises(UserError, match="model.vocab_multiple=0 is invalid"):
        run_vocab_multiple(0, None, 1, 300)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_checkpoints_saved_before_padding_load_unpadded(arch):
    model = load_model(LEGACY / arch / "step_2")
    assert (model.config.vocab_multiple, model.config.padded_vocab_size) == (1, 300)
    assert model(torch.randint(0, 300, (1, 8))).shape == (1, 8, 300)
