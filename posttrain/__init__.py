"""posttrain: TRL-compatible post-training with fused kernels on the hot paths."""

__version__ = "0.1.0"
