"""The merge report (`merge_report.json`) and the model card (`README.md`) that go with a merged model."""
import json
from pathlib import Path

import torch

from workbench import __version__
from workbench.config.schema import to_dict
from workbench.kernels.dispatch import describe, kernel_backend
from workbench.merge.model_card import front_matter, origin_label, publication_sections
from workbench.merge.recipe import PAPERS
from workbench.provenance import cached_file_sha256



COUNTS = ("kept", "kept_entered", "protected", "protected_entered", "kept_entered_without_slack",
          "protected_entered_without_slack")


def _share(part: int, whole: int):
    return part / whole if whole else None


def _expert_summary(recipe, records) -> list:
    """Per expert of the recipe (and of a layer swap's middle recipe): its top-k count and the share of it that
    entered the merge, its protected count and the share of that that entered, and for ties_sv both shares
    under the plain TIES election (the difference the slack makes: Tao et al.'s diagnostic)."""
    recipes = [recipe] + ([recipe.layer_swap.middle] if recipe.layer_swap and recipe.layer_swap.middle else [])
    out = []
    for r in recipes:
        for i, entry in enumerate(r.models):
            totals = dict.fromkeys(COUNTS + ("numel", "nonfinite"), 0)
            for rec in records.values():
                if "kept" not in rec or rec.get("method") != r.method:
                    continue
                totals["numel"] += rec["numel"]
                for key in COUNTS:
                    totals[key] += rec[key][i]
                totals["nonfinite"] += (rec.get("nonfinite") or [0] * len(r.models))[i]
            if not totals["numel"]:
                continue
            row = {"model": entry.model, "method": r.method, "density": entry.density, "slack": entry.slack,
                   **totals, "kept_fraction": totals["kept"] / totals["numel"],
                   "kept_entered_share": _share(totals["kept_entered"], totals["kept"]),
                   "protected_entered_share": _share(totals["protected_entered"], totals["protected"])}
            if r.method == "ties_sv":
                row["kept_entered_share_without_slack"] = _share(totals["kept_entered_without_slack"], totals["kept"])
                row["protected_entered_share_without_slack"] = _share(totals["protected_entered_without_slack"],
                                                                      totals["protected"])
            out.append(row)
    return out


def describe_entered(e: dict) -> str:
    """One line of an expert's summary: its top-k and protected elements and the shares that entered."""
    text = (f"density {e['density']:g}, slack {e['slack']:g}: top-k {e['kept']:,} elements "
            f"({e['kept_fraction']:.1%}), {_percent(e['kept_entered_share'])} entered the merge")
    if "kept_entered_share_without_slack" in e:
        text += f" ({_percent(e['kept_entered_share_without_slack'])} without slack)"
    if e["protected"]:
        text += f"; protected {e['protected']:,}, {_percent(e['protected_entered_share'])} entered"
        if "protected_entered_share_without_slack" in e:
            text += f" ({_percent(e['protected_entered_share_without_slack'])} without slack)"
    return text


def kernels_description(records, device) -> str:
    """Which kernels merged, from the tensors' records (dispatch.kernel_backend's answers that ran): one
    phrase when one backend did everything, else each with its tensor count."""
    ran = {}
    for rec in records.values():
        if rec.get("kernels"):
            ran[rec["kernels"]] = ran.get(rec["kernels"], 0) + 1
    if not ran:
        return describe(kernel_backend(torch.empty(0, device=device), native=True))
    if len(ran) == 1:
        return describe(next(iter(ran)))
    return ", ".join(f"{describe(backend)} for {count} tensors" for backend, count in
                     sorted(ran.items(), key=lambda item: -item[1]))


def build_report(recipe, models, readers, plan, compat, records, scope_selections, profiles, seconds,
                 device) -> dict:
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
        "kernels": kernels_description(records, device),
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
    if scope_selections:
        report["model_scope_thresholds"] = {
            e.model: {"tau_keep": keep.tau, "keep_count": keep.count,
                      "tau_protect": None if protect is None else protect.tau,
                      "protect_count": None if protect is None else protect.count}
            for e, (keep, protect) in zip(recipe.models, scope_selections)}
    return report


def render_card(report: dict) -> str:
    """A Hugging Face model card: what was merged, how, from which exact files."""
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
        lines += ["", "## What entered the merge (TIES / TIES-SV diagnostic)", "",
                  "Top-k: the elements the trim kept (density); protected: the top slack share, whose sign votes "
                  "alone in the election (TIES-SV). Entered: agreed with the elected sign and went into the merge. "
                  "For ties_sv, the same shares under the plain TIES election show what the slack changed.", "",
                  "| model | method | density | slack | top-k | entered | protected | entered | top-k entered "
                  "without slack | protected entered without slack |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for e in report["experts"]:
            lines.append(f"| {e['model']} | {e['method']} | {e['density']:g} | {e['slack']:g} | {e['kept']:,} | "
                         f"{_percent(e['kept_entered_share'])} | {e['protected']:,} | "
                         f"{_percent(e['protected_entered_share'])} | "
                         f"{_percent(e.get('kept_entered_share_without_slack'))} | "
                         f"{_percent(e.get('protected_entered_share_without_slack'))} |")
    if report["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    lines += publication_sections(report)
    lines += ["", "Per-tensor details are in `merge_report.json`.", ""]
    return "\n".join(lines)


def _percent(share) -> str:
    return "–" if share is None else f"{share:.1%}"
