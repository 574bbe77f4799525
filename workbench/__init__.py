"""workbench: low-resource language adaptation (continual pretraining, task experts, fused merges)."""

__version__ = "0.1.0"
