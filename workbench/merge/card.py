"""The merge report (`merge_report.json`) and the model card (`README.md`) that go with a merged model."""
import json
from pathlib import Path

from workbench import __version__
from workbench.config.schema import to_dict
from workbench.merge.recipe import PAPERS
from workbench.provenance import cached_file_sha256


def _expert_summary(recipe, records) -> list:
    """Per expert of the recipe (and of a layer swap's middle recipe): top-k elements kept, how many survived
    the sign election, and how many slack elements got their second chance (Tao et al.'s diagnostic)."""
    recipes = [recipe] + ([recipe.layer_swap.middle] if recipe.layer_swap and recipe.layer_swap.middle else [])
    out = []
    for r in recipes:
        for i, entry in enumerate(r.models):
            totals = {"kept": 0, "survived": 0, "slack_admitted": 0, "numel": 0, "nonfinite": 0}
            for rec in records.values():
                if "kept" not in rec or rec.get("method") != r.method:
                    continue
                totals["numel"] += rec["numel"]
                for key in ("kept", "survived", "slack_admitted"):
                    totals[key] += rec[key][i]
                totals["nonfinite"] += (rec.get("nonfinite") or [0] * len(r.models))[i]
            if not totals["numel"]:
                continue
            kept = max(totals["kept"], 1)
            out.append({"model": entry.model, "method": r.method, "density": entry.density, "slack": entry.slack,
                        **totals, "kept_fraction": totals["kept"] / totals["numel"],
                        "survival_without_slack": totals["survived"] / kept,
                        "entered_with_slack": (totals["survived"] + totals["slack_admitted"]) / kept})
    return out


def kernels_description(device) -> str:
    """Which kernels merged on `device`: Triton, the CPU path's C kernels or its PyTorch pieces, the references."""
    import torch

    from workbench.kernels import cpu_native
    from workbench.kernels.dispatch import kernel_backend

    probe = torch.empty(0, device=device)
    backend = kernel_backend(probe)
    if backend == "cpu":
        return cpu_native.why() if probe.device.type == "cpu" else f"vectorized PyTorch on {probe.device.type}"
    return {"triton": "Triton", "reference": "plain PyTorch references (WORKBENCH_KERNELS=reference)"}[backend]


def build_report(recipe, models, readers, plan, compat, records, thresholds, profiles, seconds, device) -> dict:
    ops = {}
    for rec in records.values():
        ops[rec.get("op", "merge")] = ops.get(rec.get("op", "merge"), 0) + 1
    methods = [recipe.method] + ([recipe.layer_swap.middle.method] if recipe.layer_swap and
                                 recipe.layer_swap.middle else [])
    report = {
        "workbench_version": __version__,
        "method": recipe.method,
        "papers": {m: PAPERS[m] for m in dict.fromkeys(methods)},
        "recipe": to_dict(recipe),
        "inputs": {ref: {"path": str(models[ref]),
                         "files": {Path(f).name: cached_file_sha256(f) for f in sorted(readers[ref].files)}}
                   for ref in readers},
        "output": {"tensors": len(plan.ops), "config_from": plan.config_source,
                   "dtypes": sorted({str(op.dtype).replace("torch.", "") for op in plan.ops}),
                   "extended_vocab": plan.extended, "shared_vocab_rows": plan.shared_rows},
        "operations": ops,
        "experts": _expert_summary(recipe, records),
        "nonfinite_total": sum(sum(r.get("nonfinite") or [0]) if isinstance(r.get("nonfinite"), list)
                               else r.get("nonfinite", 0) for r in records.values()),
        "notes": list(plan.notes),
        "warnings": list(compat.warnings),
        "device": str(device),
        "kernels": kernels_description(device),
        "seconds": round(seconds, 3),
        "tensors": records,
    }
    if plan.swap is not None:
        swap = plan.swap
        report["layer_swap"] = {"num_layers": swap.num_layers, "bottom": swap.bottom, "top": swap.top,
                                "transition": swap.transition, "alphas": list(swap.alphas),
                                "chosen_by": swap.chosen_by, "description": swap.describe()}
    if profiles is not None:
        report["delta_profiles"] = {ref: {"layer_relative_change": p["layer_relative_change"],
                                          "total": p["total"]} for ref, p in profiles.items()}
    if thresholds:
        first = next(iter(thresholds.values()))
        report["model_scope_thresholds"] = {e.model: {"tau_hi": hi, "tau_lo": lo}
                                            for e, (hi, lo) in zip(recipe.models, first)}
    return report


def render_card(report: dict) -> str:
    """A Hugging Face model card: what was merged, how, from which exact files."""
    from workbench.merge.model_card import front_matter, origin_label, publication_sections

    recipe = report["recipe"]
    origins = (report.get("publication") or {}).get("inputs", {})
    lines = front_matter(report)
    lines += ["", f"# Merged model ({report['method']})", "",
              f"Made with workbench {report['workbench_version']} in {report['seconds']:.1f} s on "
              f"{report['device']} ({report.get('kernels', 'kernels not recorded')}).", "", "## Method", ""]
    lines += [f"- `{m}`: {paper}" for m, paper in report["papers"].items()]
    if "layer_swap" in report:
        lines += ["", f"Layer swap: {report['layer_swap']['description']}"]
    for note in report["notes"]:
        lines.append(f"- {note}")
    lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2), "```", "", "## Inputs", "",
              "| model | source | file | sha256 |", "| --- | --- | --- | --- |"]
    for ref, info in report["inputs"].items():
        for fname, digest in info["files"].items():
            where = origin_label(origins[ref]) if ref in origins else Path(info["path"]).name
            lines.append(f"| {ref} | {where} | {fname} | `{digest}` |")
    if report["experts"]:
        lines += ["", "## Top-k survival (TIES / TIES-SV diagnostic)", "",
                  "| model | density | slack | kept | survived election | slack admitted | survival without slack "
                  "| entered with slack |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for e in report["experts"]:
            lines.append(f"| {e['model']} | {e['density']:g} | {e['slack']:g} | {e['kept']:,} | {e['survived']:,} | "
                         f"{e['slack_admitted']:,} | {e['survival_without_slack']:.1%} | "
                         f"{e['entered_with_slack']:.1%} |")
    if report["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    lines += publication_sections(report)
    lines += ["", "Per-tensor details are in `merge_report.json`.", ""]
    return "\n".join(lines)
