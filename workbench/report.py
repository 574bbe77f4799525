"""The run report (`report.md`, `report.json`): every model on every metric, what was merged and how, and a
plain statement of which model did best on the target language and whether each merge beat each expert.

Reads finished stage records (plain data) only; numbers are copied from the evaluation's own results file,
never recomputed, so the report and the evaluation outputs agree by construction.
"""
import json
import math
import shutil
from pathlib import Path

import yaml

from workbench.evaluation.table import markdown_table, wilson_interval
from workbench.export.modelfile import run_commands
from workbench.merge.card import describe_entered


def _load(path):
    return json.loads(Path(path).read_text(encoding="utf-8")) if path and Path(path).is_file() else None


def target_accuracy(metrics: dict, code: str) -> dict | None:
    """Accuracy pooled over the target-language task sets (MGSM sample and generated problems)."""
    correct = n = 0
    used = []
    for task, rec in metrics.items():
        if rec.get("kind") == "accuracy" and task.endswith(f"_{code}"):
            correct += rec["correct"]
            n += rec["n"]
            used.append(task)
    if not n:
        return None
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n, "low": low, "high": high, "correct": correct, "n": n, "tasks": used}


def _perplexity(metrics: dict, code: str):
    rec = metrics.get(f"perplexity_{code}")
    return rec["perplexity"] if rec else None


def verdicts(rows: dict, code: str, merges: list, experts: list) -> dict:
    """Best model on the target language, and each merge against each expert, stated plainly."""
    scored = {m: target_accuracy(metrics, code) for m, metrics in rows.items()}
    scored = {m: s for m, s in scored.items() if s is not None}
    out = {"target_accuracy": scored, "statements": []}
    if not scored:
        out["statements"].append("No target-language task was evaluated, so no model can be called best on it.")
        return out

    def key(m):
        ppl = _perplexity(rows[m], code)
        return (scored[m]["accuracy"], -(ppl if ppl is not None else math.inf))

    best = max(scored, key=key)
    top = scored[best]
    out["best"] = best
    tied = [m for m in scored if m != best and scored[m]["accuracy"] == top["accuracy"]]
    line = (f"Best on the target language: **{best}**, {100 * top['accuracy']:.1f}% "
            f"({top['correct']}/{top['n']}, 95% interval {100 * top['low']:.1f}–{100 * top['high']:.1f}%) "
            f"pooled over {', '.join(top['tasks'])}")
    if tied:
        line += f"; tied on accuracy with {', '.join(tied)} (lower target-language perplexity decided)"
    overlapping = [m for m in scored if m != best and scored[m]["high"] >= top["low"]]
    if overlapping:
        line += (f". Its interval overlaps those of {', '.join(overlapping)}: at this sample size the ranking is "
                 f"not conclusive")
    out["statements"].append(line + ".")
    for merge in merges:
        if merge not in scored:
            continue
        m = scored[merge]
        for expert in experts:
            if expert not in scored:
                continue
            e = scored[expert]
            diff = m["accuracy"] - e["accuracy"]
            verb = "beat" if diff > 0 else ("tied with" if diff == 0 else "did not beat")
            sig = "" if diff == 0 else (" (intervals overlap: not a significant difference)"
                                        if m["low"] <= e["high"] and e["low"] <= m["high"] else " (intervals apart)")
            out["statements"].append(f"{merge} {verb} {expert}: {100 * m['accuracy']:.1f}% vs "
                                     f"{100 * e['accuracy']:.1f}%{sig}.")
    return out


def run_verdicts(loaded, table: dict) -> dict:
    """The verdicts of a run's evaluation table (which model is best, each merge against each expert)."""
    profile = loaded.profile
    return verdicts(table["rows"], loaded.language.code, list(profile.merges), ["language"] + list(profile.experts))


def recommended_model(loaded, table: dict) -> str | None:
    """The model the report recommends: best on the target language (None when no target task ran)."""
    return run_verdicts(loaded, table).get("best")


def write_report(loaded, records: dict, run_dir) -> dict:
    """report.md and report.json in `run_dir` from the finished stages' records."""
    run_dir = Path(run_dir)
    profile, lang = loaded.profile, loaded.language
    table = _load(records["evaluate"]["outputs"]["table"])
    merges = list(profile.merges)
    verdict = run_verdicts(loaded, table)
    merge_reports = {n: _load(records[f"merge:{n}"]["outputs"]["report"]) for n in merges}
    assets = run_dir / "report_assets"
    assets.mkdir(exist_ok=True)
    heatmap = records["analyze"]["outputs"]["heatmap"]
    shutil.copyfile(heatmap, assets / "delta_heatmap.png")
    shutil.copyfile(records["evaluate"]["outputs"]["plot"], assets / "results.png")
    fertility = records.get("tokenizer", {}).get("outputs", {}).get("fertility")
    body = {
        "language": {"code": lang.code, "name": lang.name, "script": lang.script},
        "profile": loaded.profile_name,
        "description": " ".join(profile.description.split()),
        "config_file": loaded.source,
        "table": {"columns": table["columns"], "rows": table["rows"], "notes": table.get("notes", [])},
        "models": table["models"],
        "verdict": verdict,
        "merges": {n: {"method": r["method"], "layer_swap": r.get("layer_swap"), "experts": r["experts"],
                       "notes": r["notes"], "seconds": r["seconds"]} for n, r in merge_reports.items()},
        "fertility": fertility,
        "corpus": records.get("corpus", {}).get("outputs", {}).get("stats"),
        "language_expert": records["language_expert"]["outputs"].get("summary"),
        "stages": {name: {"key": rec["key"], "seconds": rec.get("seconds")} for name, rec in records.items()},
        "inputs": _load(records["fetch"]["outputs"]["manifest"]),
        "settings": loaded.raw["profiles"][loaded.profile_name],
        "export": export_summary(records.get("export")),
    }
    (run_dir / "report.json").write_text(json.dumps(body, indent=2, ensure_ascii=False, default=str) + "\n",
                                         encoding="utf-8")
    (run_dir / "report.md").write_text(render_markdown(body, table), encoding="utf-8")
    return {"markdown": str(run_dir / "report.md"), "json": str(run_dir / "report.json"),
            "best": verdict.get("best")}


def render_markdown(body: dict, table: dict) -> str:
    lang = body["language"]
    out = [f"# {lang['name']} ({lang['code']}): profile `{body['profile']}`", ""]
    if body.get("description"):
        out += [f"What this run is, as its profile says: {body['description']}", ""]
    out += ["## Outcome", ""] + [f"- {s}" for s in body["verdict"]["statements"]] + [""]
    out += ["## Results", "", markdown_table(table).rstrip(), "", "![results](report_assets/results.png)", ""]
    out += ["## What changed where: delta heatmap", "",
            "Relative change ‖δ‖/‖θ_b‖ of each expert per layer and module kind against the base.", "",
            "![delta heatmap](report_assets/delta_heatmap.png)", ""]
    for name, merge in body["merges"].items():
        out += [f"## Merge `{name}` ({merge['method']}, {merge['seconds']:.1f} s)", ""]
        if merge["layer_swap"]:
            swap = merge["layer_swap"]
            out.append(f"- Layers: {swap['description']}")
        for e in merge["experts"]:
            out.append(f"- {e['model']}: {describe_entered(e)}")
        out += [f"- Note: {n}" for n in merge["notes"]] + [""]
    out += export_section(body.get("export"))
    if body["fertility"]:
        out += ["## Tokenizer fertility", "", "| tokenizer / text | chars per token | tokens per word | byte "
                "fallback | partial characters |", "| --- | ---: | ---: | ---: | ---: |"]
        for side in ("base", "extended"):
            for part, rec in (body["fertility"].get(side) or {}).items():
                tpw = rec.get("tokens_per_word")
                out.append(f"| {side} / {part} | {rec['chars_per_token']:.2f} | "
                           f"{'–' if tpw is None else format(tpw, '.2f')} | {rec['byte_fallback_share']:.1%} | "
                           f"{rec['partial_char_share']:.1%} |")
        out.append("")
    if body["language_expert"]:
        out += ["## Language expert", "", "```json", json.dumps(body["language_expert"], indent=2, default=str),
                "```", ""]
    out += ["## Stages", "", "| stage | key | seconds |", "| --- | --- | ---: |"]
    out += [f"| {n} | `{s['key']}` | {s['seconds'] if s['seconds'] is not None else ''} |"
            for n, s in body["stages"].items()]
    out += ["", "## Exact settings", "", f"From `{body['config_file']}`:", "", "```yaml",
            yaml.safe_dump(body["settings"], sort_keys=False, allow_unicode=True).rstrip(), "```", "",
            "Input files and their sha256 are in `report.json` (`inputs`).", ""]
    return "\n".join(out)


def export_summary(record: dict | None) -> dict | None:
    """The export stage's file, size and run commands, or None when the profile has no export."""
    if record is None:
        return None

    out = record["outputs"]
    if not out.get("gguf"):
        return {"note": out.get("note")}
    gguf = Path(record["path"]) / out["gguf"]
    return {"model": out["model"], "gguf": str(gguf), "type": out["type"], "bytes": out["bytes"],
            "sha256": out["sha256"], "modelfile": str(gguf.parent / out["modelfile"]),
            "commands": run_commands(gguf, out["ollama_name"]), "notes": out.get("notes", [])}


def export_section(export: dict | None) -> list:
    if not export:
        return []
    if "gguf" not in export:
        return ["## Run it locally", "", f"- {export['note']}", ""]
    return ["## Run it locally", "",
            f"The recommended model (**{export['model']}**) as GGUF ({export['type']}): `{export['gguf']}` "
            f"({export['bytes'] / 1024**2:.1f} MiB, sha256 `{export['sha256']}`), with an Ollama Modelfile beside it.",
            "", "```bash", export["commands"]["ollama"], export["commands"]["llama_cpp"], "```", ""] + \
        [f"- Note: {n}" for n in export["notes"]] + ([""] if export["notes"] else [])
