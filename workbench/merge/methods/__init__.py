"""Merge methods: one file each, registered by name. A method sees tensors and parameters, returns a tensor.

Methods never open files: the engine reads the inputs, calls the method, writes the result.
"""
from dataclasses import dataclass, field
from typing import Callable

import torch

REGISTRY: dict[str, Callable] = {}


def register(name: str):
    def wrap(fn):
        REGISTRY[name] = fn
        return fn

    return wrap


@dataclass
class TensorMerge:
    """One tensor's inputs and parameters (DESIGN.md §3: δ_t = θ_t − θ_b, computed in fp32 by the kernels)."""

    name: str
    base: torch.Tensor | None
    experts: list  # list[torch.Tensor], same shape as base; the engine's private buffers (a method may write into them)
    weights: list  # w_t
    densities: list  # k_t
    slacks: list  # s_t
    lam: float = 1.0
    normalize: bool = True
    consensus: str = "sum"
    seed: int = 0  # DARE's per-tensor seed
    thresholds: list | None = None  # model scope: [(tau_hi, tau_lo), ...] per expert, computed by the engine
    out: torch.Tensor | None = None  # where to write (may be `base` itself)


@dataclass
class MergeInfo:
    """What the report shows for one tensor."""

    method: str
    numel: int
    kept: list = field(default_factory=list)  # per expert: |keep_t|
    survived: list = field(default_factory=list)  # |keep_t ∧ agree_t|: top-k elements that won the election
    slack_admitted: list = field(default_factory=list)  # |slack_t ∧ agree_t|: second chances taken
    nonfinite: list = field(default_factory=list)  # per expert: non-finite δ elements (treated as 0)
    thresholds: list = field(default_factory=list)  # per expert: [tau_hi, tau_lo]

    def as_record(self) -> dict:
        rec = {"method": self.method, "numel": self.numel}
        if self.kept:
            n = max(self.numel, 1)
            rec.update(kept_fraction=[k / n for k in self.kept], kept=self.kept, survived=self.survived,
                       slack_admitted=self.slack_admitted, thresholds=self.thresholds)
        if any(self.nonfinite):
            rec["nonfinite"] = self.nonfinite
        return rec


def merge_tensor(method: str, job: TensorMerge) -> tuple[torch.Tensor, MergeInfo]:
    if method not in REGISTRY:
        raise KeyError(f"merge method {method!r} is not registered; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[method](job)


# Register the methods (each module adds itself).
from workbench.merge.methods import dare_ties, linear, task_arithmetic, ties  # noqa: E402,F401
