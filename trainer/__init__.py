"""Distributed pretraining of GPT- and BERT-style transformers."""

__version__ = "0.1.0"
