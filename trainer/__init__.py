"""Distributed pretraining of GPT- and BERT-style transformers."""

import os as _os

# PyTorch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when this is set (read at the
# first large allocation, so it must be set before any model exists). Training allocates and frees activations and
# logits of hundreds of MB every step; with 4 KB pages the kernel faults and zeroes each page again, which costs
# about 9% of the step at 16M parameters on CPU. An explicit THP_MEM_ALLOC_ENABLE=0 turns it off.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
