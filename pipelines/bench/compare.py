"""Compare two merges of the same inputs, element by element: workbench's output against mergekit's.

Where a tie decides, the tools decide differently by design, so those elements are counted apart:
- the *threshold band*: elements where some expert's |δ| equals its trim threshold, in either tool's
  arithmetic (workbench ranks |δ| in fp32; mergekit, with `dtype: bfloat16`, the δ it computed in the
  storage dtype). workbench keeps the first ties in flat order, mergekit the ones `argsort` puts first;
- *zero elections*: elements where the trimmed votes Σ_t keep_t·w_t·δ_t cancel exactly (bf16 deltas are
  quantized, so δ_a = −δ_b is common). TIES as written elects sign(0) = 0 and merges nothing there
  (docs/design.md §4.4); mergekit elects +1 and keeps the positive delta.
Per method:
- the share of the elements outside the threshold band that differ by more than `ULPS` ulps, and the share
  of those differences that are zero elections, and the share that differ outside both. The ulp is taken
  at the scale of the element's inputs and outputs, max(|θ_b|, |out_a|, |out_b|): a tool that computes in
  bf16 leaves errors of a few ulps of that scale, which are many ulps of a small output where base and
  delta cancel; the count in ulps of the outputs themselves is reported too ("strict");
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

from workbench.kernels.topk_threshold import keep_count, topk_member_reference, topk_select

ULPS = 2
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


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


def _beyond_scale_ulps(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor, ulps: int) -> torch.Tensor:
    """Flat bool: |a − b| > `ulps` ulps of the storage dtype at the scale max(|base|, |a|, |b|)."""
    x, y, z = (t.float().reshape(-1) for t in (a, b, base))
    scale = torch.maximum(torch.maximum(x.abs(), y.abs()), z.abs())
    _, exponent = torch.frexp(scale)                            # scale = m·2^e, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(scale), exponent - 1 - MANTISSA_BITS[a.dtype])
    return (x - y).abs() > ulps * ulp


def tie_bands(base: torch.Tensor, experts: list, densities: list, weights: list,
              storage_deltas: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold band, zero elections) as flat bool masks (see the module docstring). storage_deltas:
    whether the other tool computed δ in the storage dtype (adds its thresholds and its votes)."""
    n = base.numel()
    band = torch.zeros(n, dtype=torch.bool)
    vote = torch.zeros(n)
    stored_vote = torch.zeros(n)
    kept_any = torch.zeros(n, dtype=torch.bool)
    for expert, k, w in zip(experts, densities, weights):
        d = (expert.float() - base.float()).reshape(-1)
        stored = (expert - base).reshape(-1).float()                    # mergekit's δ, in the storage dtype
        if k >= 1.0:
            keep = torch.ones(n, dtype=torch.bool)
        else:
            sel = topk_select(base, expert, [k])[0]
            band |= d.abs() == sel.tau
            keep = topk_member_reference(d.abs(), torch.ones(n, dtype=torch.bool), sel)
            if storage_deltas:
                band |= stored.abs() == torch.kthvalue(stored.abs(), n - keep_count(k, n) + 1).values
        kept_any |= keep
        vote += torch.where(keep, w * d, 0.0)
        stored_vote += torch.where(keep, w * stored, 0.0)
    zero = kept_any & ((vote == 0) | ((stored_vote == 0) if storage_deltas else False))
    return band, zero


def compare_merges(ours, theirs, base_dir, expert_dirs: list, densities: list, weights: list | None = None,
                   ulps: int = ULPS, storage_deltas: bool = True) -> dict:
    """Figures for two merged model directories of the same inputs (see the module docstring). Trimmed
    methods (densities < 1) get both tie bands; others (task arithmetic) none. storage_deltas: whether the
    other tool computed δ in the storage dtype (mergekit with `dtype: bfloat16`)."""
    a, b, base_model = _Model(ours), _Model(theirs), _Model(base_dir)
    experts = [_Model(d) for d in expert_dirs]
    weights = weights or [1.0] * len(experts)
    trimmed = any(k < 1 for k in densities)
    names = sorted(set(a.files) & set(b.files) & set(base_model.files))
    sums = dict.fromkeys(("elements", "band", "zero", "outside", "differ", "differ_zero", "differ_band",
                          "strict"), 0)
    worst = (0.0, None)
    per_tensor = {}
    for name in names:
        mine, other, base = a.get(name), b.get(name), base_model.get(name)
        if mine.shape != other.shape or not mine.is_floating_point():
            continue
        other = other.to(mine.dtype)
        n = base.numel()
        if trimmed:
            band, zero = tie_bands(base, [e.get(name) for e in experts], densities, weights, storage_deltas)
        else:
            band = zero = torch.zeros(n, dtype=torch.bool)
        far = _beyond_scale_ulps(mine, other, base.to(mine.dtype), ulps)
        strict = ((_ordered(mine) - _ordered(other)).abs() > ulps).reshape(-1)
        sums["elements"] += n
        sums["band"] += int(band.sum())
        sums["zero"] += int((zero & ~band).sum())
        sums["differ"] += int((far & ~band).sum())
        sums["differ_zero"] += int((far & zero & ~band).sum())
        sums["differ_band"] += int((far & band).sum())
        sums["strict"] += int((strict & ~band).sum())
        changed_mine = float((mine.view(-1) != base.view(-1)).double().mean()) if n else 0.0
        changed_theirs = float((other.view(-1) != base.to(other.dtype).view(-1)).double().mean()) if n else 0.0
        per_tensor[name] = {"changed_workbench": changed_mine, "changed_mergekit": changed_theirs,
                            "threshold_band": int(band.sum()) / n if n else 0.0}
        if abs(changed_mine - changed_theirs) > worst[0] or worst[1] is None:
            worst = (abs(changed_mine - changed_theirs), name)
    total, band = sums["elements"], sums["band"]
    outside = total - band
    outside_both = outside - sums["zero"]
    return {"tensors": len(per_tensor), "elements": total, "ulps": ulps,
            "threshold_band_share": band / total if total else 0.0,
            "zero_election_share": sums["zero"] / total if total else 0.0,
            "differ_outside_band_share": sums["differ"] / outside if outside else 0.0,
            "differ_outside_band_share_strict": sums["strict"] / outside if outside else 0.0,
            "differences_at_zero_elections": sums["differ_zero"] / sums["differ"] if sums["differ"] else 0.0,
            "differ_outside_both_share": (sums["differ"] - sums["differ_zero"]) / outside_both if outside_both
            else 0.0,
            "differ_inside_band_share": sums["differ_band"] / band if band else 0.0,
            "max_changed_share_gap_pp": 100 * worst[0], "max_changed_share_gap_tensor": worst[1],
            "per_tensor": per_tensor}


def format_comparison(method: str, c: dict) -> str:
    return (f"{method}: outside the threshold band ({100 * (1 - c['threshold_band_share']):.1f}% of "
            f"{c['elements']:,} elements) {c['differ_outside_band_share']:.2e} differ by more than {c['ulps']} ulps "
            f"at the inputs' scale ({c['differ_outside_band_share_strict']:.2e} in ulps of the outputs), "
            f"{c['differences_at_zero_elections']:.1%} of them at zero elections; outside both "
            f"{c['differ_outside_both_share']:.2e}; inside the band {c['differ_inside_band_share']:.1%}; per tensor "
            f"the changed shares differ by at most {c['max_changed_share_gap_pp']:.3f} percentage points "
            f"({c['max_changed_share_gap_tensor']})")


def targets_met(c: dict) -> bool:
    """Issue 17's targets, with the tied band taken as both kinds of tie: < 1e-4 of the elements outside it
    differ; per tensor the changed shares within 0.5 percentage points."""
    return c["differ_outside_both_share"] < 1e-4 and c["max_changed_share_gap_pp"] <= 0.5 and \
        math.isfinite(c["max_changed_share_gap_pp"])
