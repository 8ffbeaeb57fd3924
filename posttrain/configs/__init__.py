"""Trainer configs: TrainingArguments subclasses with TRL 1.16's field names and defaults."""

from .base import PosttrainConfig

__all__ = ["PosttrainConfig"]
