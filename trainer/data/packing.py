"""How a content token stream becomes packed samples for the model family's objective: next-token (causal, GPT and
Llama) or masked-token (masked, BERT).

Content stream = documents' tokens, each followed by a separator (causal: <|endoftext|>, masked: [SEP]): a prepared
corpus repeated forever, or one logical stream of a raw source (logical_streams.py). Window w of a stream, with seq_len T:

- causal: content[w*T : w*T + T + 1];  input_ids = window[:-1], labels = window[1:].
- masked: [CLS] + content[w*(T-2) : (w+1)*(T-2)] + [SEP], with MLM masks drawn from a generator seeded by
  (seed, global sample index), so masks depend on the sample only (never on rank, micro_batch or worker count).

Which window global sample g is, is the order's business (sample_stream.py); every path only supplies windows and the
samples are made here, so the same window gives the same sample whatever its source.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trainer.errors import UserError
from trainer.tokenizer import TokenizerInfo

OBJECTIVES = ("causal", "masked")  # next-token samples (decoders) | masked-token samples (encoders)
# Prepared shards' meta.json and saved data positions name the objective by the tag written before objectives had
# names ("arch": "gpt" | "bert"); it stays, so corpora prepared and checkpoints written earlier remain valid.
STORED_TAG = {"causal": "gpt", "masked": "bert"}
FROM_TAG = {tag: objective for objective, tag in STORED_TAG.items()}


def objective_of(value: str) -> str:
    """`value` as an objective: "causal" or "masked" (a stored tag, "gpt" or "bert", reads as its objective)."""
    objective = FROM_TAG.get(value, value)
    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective {value!r}; use causal (next-token) or masked (masked-token)")
    return objective


IGNORE_INDEX = -100  # label value the loss ignores
MLM_PROB = 0.15  # share of non-special positions chosen for prediction
MLM_MASK_SHARE, MLM_RANDOM_SHARE = 0.8, 0.1  # of the chosen: 80% -> [MASK], 10% -> random token, 10% unchanged


def separator_id(info: TokenizerInfo, objective: str) -> int:
    """The token that ends every document in the content stream: the end-of-text token for next-token (causal)
    samples, [SEP] for masked ones."""
    if objective_of(objective) == "causal":
        if info.eos_id is None:
            raise UserError(
                f"tokenizer {info.path} has no end-of-text token (<|endoftext|>); a next-token model needs one: train "
                f"a tokenizer with `trainer tokenizer --kind bpe`"
            )
        return info.eos_id
    missing = [
        name for name, i in (("[CLS]", info.cls_id), ("[SEP]", info.sep_id), ("[MASK]", info.mask_id)) if i is None
    ]
    if missing:
        raise UserError(
            f"tokenizer {info.path} lacks {', '.join(missing)}; a masked-token model needs a wordpiece tokenizer "
            f"(`trainer tokenizer --kind wordpiece`)"
        )
    return info.sep_id


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed from (run seed, global sample index): per-sample randomness that any rank can redo."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class SampleSpec:
    """Everything that turns a content window into a training sample: objective, seq_len, seed and special ids."""

    objective: str
    seq_len: int
    seed: int
    separator_id: int
    cls_id: int | None
    sep_id: int | None
    mask_id: int | None
    no_mask_ids: torch.Tensor  # positions holding these ids are never chosen for MLM ([CLS], [SEP], [PAD], [MASK])
    random_ids: torch.Tensor  # non-special ids, the pool for MLM random replacements

    @classmethod
    def create(cls, info: TokenizerInfo, objective: str, seq_len: int, seed: int) -> SampleSpec:
        """Validate objective/seq_len against the tokenizer and precompute the id tables."""
        objective = objective_of(objective)
        sep = separator_id(info, objective)
        minimum = 1 if objective == "causal" else 3
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < minimum:
            raise UserError(f"data.seq_len={seq_len!r} is invalid for {objective} samples; use an integer >= {minimum}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"run.seed={seed!r} is not an integer; set an integer seed")
        no_mask = [i for i in (info.cls_id, info.sep_id, info.pad_id, info.mask_id) if i is not None]
        specials = info.special_ids
        random_ids = [i for i in range(info.vocab_size) if i not in specials]
        if objective == "masked" and not random_ids:
            raise UserError(f"tokenizer {info.path} has only special tokens; train it on a corpus with a larger vocab")
        return cls(
            objective=objective,
            seq_len=seq_len,
            seed=seed,
            separator_id=sep,
            cls_id=info.cls_id,
            sep_id=info.sep_id,
            mask_id=info.mask_id,
            no_mask_ids=torch.tensor(no_mask, dtype=torch.long),
            random_ids=torch.tensor(random_ids, dtype=torch.long),
        )

    @property
    def stride(self) -> int:
        """Content tokens between the starts of consecutive samples."""
        return self.seq_len if self.objective == "causal" else self.seq_len - 2

    @property
    def span(self) -> int:
        """Content tokens one sample reads (next-token samples read one more than their stride: the last label)."""
        return self.seq_len + 1 if self.objective == "causal" else self.seq_len - 2

    def make(self, window: np.ndarray, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of global sample `index` from its content window (length `span`)."""
        tokens = torch.from_numpy(np.asarray(window, dtype=np.int64))
        if self.objective == "causal":
            return tokens[:-1].clone(), tokens[1:].clone()
        ids = torch.cat([torch.tensor([self.cls_id]), tokens, torch.tensor([self.sep_id])])
        return self.mask(ids, index)

    def mask(self, ids: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked-token samples (BERT's MLM): choose 15% of maskable positions (at least 1); 80% [MASK], 10% random id, 10% unchanged.

        [CLS], [SEP], [PAD] (and [MASK]) positions are never chosen; labels are -100 except at chosen positions.
        """
        gen = torch.Generator().manual_seed(sample_seed(self.seed, index))
        labels = torch.full_like(ids, IGNORE_INDEX)
        positions = (~torch.isin(ids, self.no_mask_ids)).nonzero().squeeze(1)
        n = positions.numel()
        if n == 0:
            return ids, labels
        expected = MLM_PROB * n  # round up with probability equal to the fraction: unbiased 15% for short samples
        k = max(1, int(expected) + int(torch.rand(1, generator=gen).item() < expected - int(expected)))
        chosen = positions[torch.randperm(n, generator=gen)[:k]]
        labels[chosen] = ids[chosen]
        roll = torch.rand(k, generator=gen)
        out = ids.clone()
        out[chosen[roll < MLM_MASK_SHARE]] = self.mask_id
        swap = chosen[(roll >= MLM_MASK_SHARE) & (roll < MLM_MASK_SHARE + MLM_RANDOM_SHARE)]
        picks = torch.randint(len(self.random_ids), (swap.numel(),), generator=gen)
        out[swap] = self.random_ids[picks]
        return out, labels


class DocumentPacker:
    """Windows of an infinite content stream, cut from an ordered iterator of tokenized documents.

    `docs` yields (unit, document id, tokens incl. separator), where `unit` counts the units of the stream. Windows
    must be asked for at non-decreasing starts; documents wholly before the last start are dropped, so memory stays a
    few windows. `locate` maps a content position back to (unit, doc, offset), from which a stream restarts.
    """

    def __init__(self, docs: Iterator[tuple[int, int, np.ndarray]], first_doc_start: int) -> None:
        self._docs = docs
        self._buf: deque[tuple[int, int, int, np.ndarray]] = deque()  # (abs start, unit, doc, tokens)
        self._end = first_doc_start  # absolute content position where the next pulled document begins
        self._low = first_doc_start  # nothing before this position can be asked for any more

    def _pull(self) -> None:
        unit, doc, tokens = next(self._docs)
        self._buf.append((self._end, unit, doc, tokens))
        self._end += len(tokens)

    def _drop_before(self, pos: int) -> None:
        while self._buf and self._buf[0][0] + len(self._buf[0][3]) <= pos:
            self._buf.popleft()

    def window(self, start: int, length: int) -> np.ndarray:
        """Content tokens [start, start + length)."""
        if start < self._low:
            raise RuntimeError(f"window at {start} asked after the stream moved past {self._low}")
        self._low = start
        self._drop_before(start)
        while self._end < start + length:
            self._pull()
            self._drop_before(start)
        parts = []
        for doc_start, _, _, tokens in self._buf:
            if doc_start >= start + length:
                break
            parts.append(tokens[max(start - doc_start, 0) : start + length - doc_start])
        return np.concatenate(parts)

    def skip_to(self, pos: int) -> None:
        """Drop everything before content position `pos` (pulling documents up to it)."""
        if pos < self._low:
            raise RuntimeError(f"skip to {pos} asked after the stream moved past {self._low}")
        self._low = pos
        self._drop_before(pos)
        while self._end <= pos:
            self._pull()
            self._drop_before(pos)

    def locate(self, pos: int) -> dict:
        """{"unit", "doc", "offset"} of the document holding content position `pos` (reads ahead if needed)."""
        if pos < self._low:
            raise RuntimeError(f"position {pos} asked after the stream moved past {self._low}")
        while self._end <= pos:
            self._pull()
        for doc_start, unit, doc, tokens in self._buf:
            if doc_start <= pos < doc_start + len(tokens):
                return {"unit": unit, "doc": doc, "offset": pos - doc_start}
        raise RuntimeError(f"position {pos} is no longer buffered")
