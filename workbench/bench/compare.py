"""Compare two merges of the same inputs, element by element: workbench's output against mergekit's.

Per method (issue 17's targets for TIES):
- the share of elements that differ by more than `ULPS` units in the last place outside the *tied band*:
  the elements where some expert's |δ| equals its trim threshold, in either tool's arithmetic (workbench
  ranks |δ| in fp32, mergekit the δ it computed in the storage dtype). Inside the band the tools may keep
  different ties (mergekit keeps the ones `argsort` happens to put first), so differences there are
  expected and counted apart. The ulp is taken at the scale of the element's inputs and outputs,
  max(|θ_b|, |out_a|, |out_b|): mergekit computes δ, the vote and the mean in the storage dtype, which
  leaves errors of a few ulps of that scale; where base and delta cancel, the same error is many ulps of
  the (small) output, so the count in ulps of the outputs themselves is reported too ("strict");
- per tensor, the share of elements each tool changed (output ≠ base, bitwise) and the largest difference
  between the two shares, in percentage points, over the tensors.
Tensors are read one at a time (memory-mapped), so comparing a whole model needs a few tensors' memory.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from workbench.kernels.topk_threshold import keep_count, topk_select

ULPS = 2


def _tensor_files(model_dir: Path) -> dict:
    """{tensor name: safetensors file} of a model directory (sharded or not)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: file for name in f.keys()})
    return out


class _Model:
    def __init__(self, model_dir):
        self.files = _tensor_files(Path(model_dir))

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Bits of a float tensor as integers that order like the values (±0 both 0): ulp distance = difference."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype]
    i = t.view(bits).to(torch.int64)
    magnitude = i & ((1 << (8 * t.element_size() - 1)) - 1)
    return torch.where(i < 0, -magnitude, magnitude)


MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def _beyond_scale_ulps(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor, ulps: int) -> torch.Tensor:
    """Flat bool: |a − b| > `ulps` ulps of the storage dtype at the scale max(|base|, |a|, |b|)."""
    x, y, z = (t.float().reshape(-1) for t in (a, b, base))
    scale = torch.maximum(torch.maximum(x.abs(), y.abs()), z.abs())
    _, exponent = torch.frexp(scale)                            # scale = m·2^e, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(scale), exponent - 1 - MANTISSA_BITS[a.dtype])
    return (x - y).abs() > ulps * ulp


def tied_band(base: torch.Tensor, experts: list, densities: list) -> torch.Tensor:
    """Flat bool mask: where some expert's |δ| sits on its trim threshold, in fp32 (workbench) or in the
    storage dtype (mergekit's δ = expert − base computed in it)."""
    band = torch.zeros(base.numel(), dtype=torch.bool)
    for expert, k in zip(experts, densities):
        if k >= 1.0:
            continue
        tau = topk_select(base, expert, [k])[0].tau
        band |= ((expert.float() - base.float()).abs() == tau).reshape(-1)
        stored = (expert - base).abs().reshape(-1).float()            # mergekit's |δ|, in the storage dtype
        n = stored.numel()
        band |= stored == torch.kthvalue(stored, n - keep_count(k, n) + 1).values
    return band


def compare_merges(ours, theirs, base_dir, expert_dirs: list, densities: list, ulps: int = ULPS) -> dict:
    """Figures for two merged model directories of the same inputs (see the module docstring)."""
    a, b, base_model = _Model(ours), _Model(theirs), _Model(base_dir)
    experts = [_Model(d) for d in expert_dirs]
    names = sorted(set(a.files) & set(b.files) & set(base_model.files))
    total = band_total = differ = differ_band = strict = 0
    worst = (0.0, None)
    per_tensor = {}
    for name in names:
        mine, other, base = a.get(name), b.get(name), base_model.get(name)
        if mine.shape != other.shape or not mine.is_floating_point():
            continue
        if other.dtype != mine.dtype:
            other = other.to(mine.dtype)
        band = tied_band(base, [e.get(name) for e in experts], densities) if any(k < 1 for k in densities) \
            else torch.zeros(base.numel(), dtype=torch.bool)
        far = _beyond_scale_ulps(mine, other, base.to(mine.dtype), ulps)
        n = base.numel()
        total += n
        band_total += int(band.sum())
        differ += int((far & ~band).sum())
        differ_band += int((far & band).sum())
        strict += int((((_ordered(mine) - _ordered(other)).abs() > ulps).reshape(-1) & ~band).sum())
        changed_mine = float((mine.view(-1) != base.view(-1)).double().mean()) if n else 0.0
        changed_theirs = float((other.view(-1) != base.to(other.dtype).view(-1)).double().mean()) if n else 0.0
        gap = abs(changed_mine - changed_theirs)
        per_tensor[name] = {"changed_workbench": changed_mine, "changed_mergekit": changed_theirs,
                            "tied_band": int(band.sum()) / n if n else 0.0}
        if gap > worst[0] or worst[1] is None:
            worst = (gap, name)
    outside = total - band_total
    return {"tensors": len(per_tensor), "elements": total, "ulps": ulps,
            "tied_band_share": band_total / total if total else 0.0,
            "differ_outside_band_share": differ / outside if outside else 0.0,
            "differ_outside_band_share_strict": strict / outside if outside else 0.0,
            "differ_inside_band_share": differ_band / band_total if band_total else 0.0,
            "max_changed_share_gap_pp": 100 * worst[0], "max_changed_share_gap_tensor": worst[1],
            "per_tensor": per_tensor}


def format_comparison(method: str, c: dict) -> str:
    return (f"{method}: outside the tied band ({100 * (1 - c['tied_band_share']):.1f}% of {c['elements']:,} "
            f"elements) {c['differ_outside_band_share']:.2e} differ by more than {c['ulps']} ulps at the inputs' "
            f"scale ({c['differ_outside_band_share_strict']:.2e} in ulps of the outputs); inside it "
            f"{c['differ_inside_band_share']:.2%}; per tensor the changed shares differ by at most "
            f"{c['max_changed_share_gap_pp']:.3f} percentage points ({c['max_changed_share_gap_tensor']})")


def targets_met(c: dict) -> bool:
    """Issue 17's targets: < 1e-4 of the elements outside the tied band differ; changed shares within 0.5%."""
    return c["differ_outside_band_share"] < 1e-4 and c["max_changed_share_gap_pp"] <= 0.5 and \
        math.isfinite(c["max_changed_share_gap_pp"])
