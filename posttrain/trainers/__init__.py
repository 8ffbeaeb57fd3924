"""Trainers: thin transformers.Trainer subclasses, drop-in for TRL's."""

from .base import PosttrainTrainer

__all__ = ["PosttrainTrainer"]
