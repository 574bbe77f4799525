"""Merge methods: one file each, registered by name. A method sees tensors and parameters, returns a tensor.

Methods never open files: the engine reads the inputs, calls the method, writes the result.
"""
from dataclasses import dataclass, field
from typing import Callable

import torch

from workbench.kernels.ties import MergeCounts
from workbench.kernels.topk_threshold import TopK

REGISTRY: dict[str, Callable] = {}


def register(name: str):
    def wrap(fn):
        REGISTRY[name] = fn
        return fn

    return wrap


@dataclass
class Expert:
    """One expert's tensor with its own parameters (one record per expert, as mergekit keys its parameters
    by model: no parallel lists to drift apart)."""

    tensor: torch.Tensor  # the engine's private buffer (a method may write into it); the base's shape
    weight: float = 1.0  # w_t
    density: float = 1.0  # k_t
    slack: float = 0.0  # s_t
    selection: tuple[TopK, TopK | None] | None = None  # model scope: (keep, protect), ranked by the engine


@dataclass
class TensorMerge:
    """One tensor's inputs and parameters (docs/design.md §3: δ_t = θ_t − θ_b, computed in fp32 by the
    kernels)."""

    name: str
    base: torch.Tensor | None
    experts: list[Expert]
    lam: float = 1.0
    normalize: bool = True
    consensus: str = "sum"
    trim_ties: str = "exact"
    seed: int = 0  # DARE's per-tensor seed (`tensor_seed`)
    out: torch.Tensor | None = None  # where to write (may be `base` itself)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [e.tensor for e in self.experts]

    @property
    def weights(self) -> list[float]:
        return [e.weight for e in self.experts]


@dataclass
class MergeInfo:
    """What the report shows for one tensor: per expert, the top-k count and how much of it entered the
    merge, the protected count (TIES-SV) and how much of it entered, both also under the plain TIES
    election (the same pass), the non-finite count; the thresholds; and which kernels ran."""

    method: str
    numel: int
    kept: list = field(default_factory=list)
    kept_entered: list = field(default_factory=list)
    protected: list = field(default_factory=list)
    protected_entered: list = field(default_factory=list)
    kept_entered_without_slack: list = field(default_factory=list)
    protected_entered_without_slack: list = field(default_factory=list)
    nonfinite: list = field(default_factory=list)
    thresholds: list = field(default_factory=list)  # per expert: [keep τ, protect τ or None]
    kernels: str = ""  # dispatch.kernel_backend's answer that ran: triton, c, torch or reference

    @classmethod
    def from_counts(cls, method: str, counts: MergeCounts, thresholds=(), trimmed=True) -> "MergeInfo":
        if not trimmed:
            return cls(method, counts.numel, nonfinite=list(counts.nonfinite), kernels=counts.backend)
        return cls(method, counts.numel, kept=list(counts.kept), kept_entered=list(counts.kept_entered),
                   protected=list(counts.protected), protected_entered=list(counts.protected_entered),
                   kept_entered_without_slack=list(counts.kept_entered_without_slack),
                   protected_entered_without_slack=list(counts.protected_entered_without_slack),
                   nonfinite=list(counts.nonfinite), thresholds=[list(t) for t in thresholds], kernels=counts.backend)

    def as_record(self) -> dict:
        rec = {"method": self.method, "numel": self.numel, "kernels": self.kernels}
        if self.kept:
            n = max(self.numel, 1)
            rec.update(kept_fraction=[k / n for k in self.kept], kept=self.kept, kept_entered=self.kept_entered,
                       protected=self.protected, protected_entered=self.protected_entered,
                       kept_entered_without_slack=self.kept_entered_without_slack,
                       protected_entered_without_slack=self.protected_entered_without_slack,
                       thresholds=self.thresholds)
        if any(self.nonfinite):
            rec["nonfinite"] = self.nonfinite
        return rec


def tensor_seed(seed: int, salt: int) -> int:
    """A seed for one tensor (or one expert of it) from the recipe's seed: mixed, in [0, 2³¹)."""
    return (seed * 1000003 + salt) % (2**31)


def merge_tensor(method: str, job: TensorMerge) -> tuple[torch.Tensor, MergeInfo]:
    if method not in REGISTRY:
        raise KeyError(f"merge method {method!r} is not registered; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[method](job)


# Register the methods (each module adds itself).
from workbench.merge.methods import dare_ties, linear, task_arithmetic, ties  # noqa: E402,F401
