"""BERT: post-LayerNorm encoder with learned positions and token types, MLM head tied to the word embedding."""

from trainer.models.bert.config import PRESETS, BERTConfig
from trainer.models.bert.model import BERT
from trainer.models.family import Family

FAMILY = Family(
    arch="bert",
    title="BERT",
    config=BERTConfig,
    model=BERT,
    presets=PRESETS,
    objective="masked",
    tensor_parallel="trainer.models.bert.tensor_parallel",
    hf="trainer.models.bert.hf",
)
