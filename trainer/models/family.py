"""What a model family is: the config base class every family's config derives from, and the `Family` record a
family's package exports as `FAMILY` (config, model, presets, objective, tensor-parallel plan, Hugging Face adapter).

Code outside `trainer/models/` reads a family only through these two: it never names one.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from trainer.errors import UserError

OBJECTIVES = ("causal", "masked")  # next-token prediction (decoders) | masked-token prediction (encoders)


class ModelConfig:
    """Base of every family's config dataclass: every number that fixes a model's shape, nothing about parallelism or
    training. Every family has n_layer, n_head, d_model, d_ff, vocab_size, max_seq_len and vocab_multiple; the rest is
    its own."""

    arch: ClassVar[str]
    POSITIVE: ClassVar[tuple[str, ...]] = (
        "n_layer",
        "n_head",
        "d_model",
        "vocab_size",
        "max_seq_len",
        "d_ff",
        "vocab_multiple",
    )
    FROM_D_MODEL: ClassVar[tuple[str, ...]] = ("d_ff",)  # re-derived when d_model is overridden and they are not given
    LEGACY: ClassVar[dict[str, Any]] = {}  # keys older checkpoints saved that this family lacks, with their one value

    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    vocab_size: int  # the tokens: the tokenizer's (or the checkpoint's) vocabulary
    max_seq_len: int
    vocab_multiple: (
        int  # embedding and head rows are padded up to a multiple of it (a field of every family, default 1)
    )

    def __post_init__(self) -> None:
        self.fill_defaults()
        for name in self.POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.{name}={value!r} is invalid; set it to a positive integer")
        self.check()

    def fill_defaults(self) -> None:
        """Derived values left unset (None) get the family's published rule (e.g. d_ff = 4 * d_model)."""

    def check(self) -> None:
        """Family-specific consistency checks (UserError naming the key and the fix)."""

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding and the LM head: vocab_size rounded up to a multiple of vocab_multiple, so that
        tensor parallelism splits them evenly (and each shard stays a multiple of a matmul tile). The rows past
        vocab_size are no token: no id looks them up and the head never projects them, or masks their logits to -inf
        under tensor parallelism (trainer.models.layers.VocabHead)."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def attention_dim(self) -> int:
        """Width of the query/key products summed over heads (d_model for GPT-2 and BERT): the FLOPs of attention."""
        return self.n_head * self.head_dim

    @property
    def tied_head(self) -> bool:
        """Whether the output projection shares the token embedding's weight."""
        return True

    def saved_bytes(self, b: int, s: int, tp: int, e: int) -> dict[str, int]:
        """Bytes the forward saves for backward, per micro-batch of b x s tokens at tensor-parallel degree tp with
        sequence parallelism (e: bytes per activation element; norm statistics, attention log-sum-exps and the
        log-softmax are fp32), by part: `block` (one transformer block), `block_input` (a checkpointed block: its
        input, the residual stream), `first` (the embeddings), `last` (final norm, head and loss) and `last_chunked`
        (the same with the head and loss computed in checkpointed chunks). What a pre-LayerNorm block with GELU MLP
        and SDPA saves (GPT-2; BERT's post-LN block saves the same amounts): the norms' inputs and fp32 mean and
        rstd, the attention and MLP inputs (gathered over the sequence under tp), q, k, v, the attention output and
        its log-sum-exp, the MLP hidden before and after GELU. Families with another block override it."""
        h, f, bs, a = self.d_model, self.d_ff, b * s, self.n_head
        block = (2 * bs * h + 6 * bs * h // tp + 2 * bs * f // tp) * e + (4 * bs // tp + b * a // tp * s) * 4
        head = (bs * h // tp + bs * h) * e + 2 * bs // tp * 4
        return {
            "block": block,
            "block_input": bs * h // tp * e,
            "first": bs * 8 + s * 8,  # token ids, positions
            "last": head + bs * -(-self.padded_vocab_size // tp) * 4 + bs * 8,  # + fp32 log-softmax, labels
            "last_chunked": head + bs * 8,
        }

    def tp_divisors(self) -> dict[str, int]:
        """The dimensions (config key -> value) a tensor-parallel degree must divide. Not the vocabulary: a run pads
        its rows to a multiple of tp (`run_vocab_multiple`)."""
        return {"model.n_head": self.n_head, "model.d_ff": self.d_ff}

    def to_dict(self) -> dict:
        """Plain dict with the arch (for checkpoints and logs); `config_from_dict` rebuilds it."""
        return {"arch": self.arch, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Family:
    """One model family: what `model.arch` names. `tensor_parallel` and `hf` are modules imported on first use (they need
    torch.distributed and safetensors, which building a model does not):
    - `tensor_parallel.apply(model, tp_mesh)` shards a built model in place (DTensor plans);
    - `hf` holds the Hugging Face adapter (`trainer.models.hf.Adapter`) as `ADAPTER`."""

    arch: str
    title: str  # as printed: "GPT", "BERT", "Llama"
    config: type
    model: type[nn.Module]
    presets: dict[str, ModelConfig]
    objective: str  # one of OBJECTIVES: what the data layer packs and what evaluation reports
    tensor_parallel: str
    hf: str
    notes: dict[str, str] = field(default_factory=dict)  # preset -> what it is (the table of docs/models.md)

    def __post_init__(self) -> None:
        assert self.objective in OBJECTIVES, self.objective

    def apply_tensor_parallel(self, model: nn.Module, tp_mesh) -> None:
        importlib.import_module(self.tensor_parallel).apply(model, tp_mesh)

    @property
    def adapter(self):
        return importlib.import_module(self.hf).ADAPTER

    def setting_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]
