"""unlearn: make a causal language model forget specific outputs with a short fine-tune."""

__version__ = "0.1.0"
