"""The run report (`report.md`, `report.json`): every model on every metric, what was merged and how, which
model is recommended on the target language and by which rule, and each merge compared item by item with each
expert and baseline (`comparisons`; the Outcome states what is detectable).

Reads finished stage records (plain data) only; the table's numbers are copied from the evaluation's own
results file, never recomputed, and the paired comparisons are computed from the per-item records it names.
"""
import json
import math
import shutil
from pathlib import Path

import yaml

from workbench.evaluation.compare import compare_models, describe_comparison
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


def target_nll(metrics: dict, code: str) -> dict | None:
    """Solution NLL pooled over the target-language sets: the item-weighted mean of their means."""
    recs = {t: r for t, r in metrics.items()
            if r.get("kind") == "solution_nll" and t.endswith(f"_{code}") and r.get("n")}
    if not recs:
        return None
    n = sum(r["n"] for r in recs.values())
    out = {"mean": sum(r["mean"] * r["n"] for r in recs.values()) / n, "n": n, "tasks": list(recs),
           "tokens": {t: r.get("tokens") for t, r in recs.items()}}
    if all(isinstance(r.get("bits_per_char"), dict) for r in recs.values()):
        out["bits_per_char"] = sum(r["bits_per_char"]["mean"] * r["n"] for r in recs.values()) / n
    return out


def _nll_scale(nll: dict) -> str:
    """"mean" (nats per token) when every model scored the same number of solution tokens on each set (one
    tokenizer), else "bits_per_char" where every model has it: per token, an extended vocabulary's NLL is not
    on the base's scale."""
    recs = [r for r in nll.values() if r]
    if len({tuple(sorted(r["tokens"].items())) for r in recs}) <= 1:
        return "mean"
    return "bits_per_char" if all("bits_per_char" in r for r in recs) else "mean"


def _perplexity(metrics: dict, code: str):
    """Bits per character where recorded (comparable across tokenizers), else per-token perplexity."""
    rec = metrics.get(f"perplexity_{code}")
    return rec.get("bits_per_char", rec["perplexity"]) if rec else None


# The recommendation's rules, in order: the target-language task first, then how well the model reads the language.
RULES = (("target-language accuracy", max), ("target-language solution NLL", min), ("target-language perplexity", min))


def recommend(rows: dict, code: str) -> dict | None:
    """{"best", "rule", "tied"}: the model with the highest target-language accuracy; among those tied on it,
    the lowest target-language solution NLL; then the lowest perplexity; then the first in table order.
    `rule` names the rule that left one model, `tied` the models it separated. None when no model has a
    target-language task score (accuracy or solution NLL)."""
    nll = {m: target_nll(metrics, code) for m, metrics in rows.items()}
    scale = _nll_scale(nll)
    values = {m: ((target_accuracy(metrics, code) or {}).get("accuracy"), (nll[m] or {}).get(scale),
                  _perplexity(metrics, code)) for m, metrics in rows.items()}
    pool = [m for m, v in values.items() if v[0] is not None or v[1] is not None]
    if not pool:
        return None
    rules = [(f"{r} in bits per character (the models' tokenizers differ)" if i == 1 and scale != "mean" else r, p)
             for i, (r, p) in enumerate(RULES)]
    for i, (rule, pick) in enumerate(rules):
        scored = [m for m in pool if values[m][i] is not None and not math.isnan(values[m][i])]
        if not scored:
            continue
        top = pick(values[m][i] for m in scored)
        tied, pool = pool, [m for m in scored if values[m][i] == top]
        if len(pool) == 1:
            return {"best": pool[0], "rule": rule, "tied": [m for m in tied if m != pool[0]]}
    return {"best": pool[0], "rule": "table order (tied on every rule)", "tied": pool[1:]}


def verdicts(rows: dict, code: str) -> dict:
    """The recommended model on the target language, with the rule that decided, stated plainly."""
    scored = {m: target_accuracy(metrics, code) for m, metrics in rows.items()}
    scored = {m: s for m, s in scored.items() if s is not None}
    nll = {m: target_nll(metrics, code) for m, metrics in rows.items()}
    out = {"target_accuracy": scored, "target_solution_nll": {m: v for m, v in nll.items() if v},
           "statements": []}
    choice = recommend(rows, code)
    if choice is None:
        out["statements"].append("No target-language task was evaluated, so no model can be called best on it.")
        return out
    best = out["best"] = choice["best"]
    out["rule"] = choice["rule"]
    parts = []
    if best in scored:
        top = scored[best]
        parts.append(f"{100 * top['accuracy']:.1f}% ({top['correct']}/{top['n']}, 95% interval "
                     f"{100 * top['low']:.1f}–{100 * top['high']:.1f}%) pooled over {', '.join(top['tasks'])}")
    if nll.get(best):
        per_char = f" ({nll[best]['bits_per_char']:.3f} bits/char)" if "bits_per_char" in nll[best] else ""
        parts.append(f"solution NLL {nll[best]['mean']:.3f}{per_char} over {nll[best]['n']} items of "
                     f"{', '.join(nll[best]['tasks'])}")
    line = f"Best on the target language: **{best}**, " + "; ".join(parts)
    line += f". Decided by {choice['rule']}" + (f" (among {', '.join(choice['tied'])})" if choice["tied"] else "")
    if best in scored:
        overlapping = [m for m in scored if m != best and scored[m]["high"] >= scored[best]["low"]]
        if overlapping and choice["rule"] == RULES[0][0]:
            line += (f". Its accuracy interval overlaps those of {', '.join(overlapping)}: at this sample size the "
                     f"ranking is not conclusive")
    out["statements"].append(line + ".")
    return out


def comparison_pairs(profile) -> list[tuple[str, str]]:
    """(merge, other) for every merge that is not a baseline, against the language expert, each task expert
    and each baseline (`eval.baselines`)."""
    baselines = list(profile.eval.baselines)
    merges = [m for m in profile.merges if m not in baselines]
    others = ["language"] + [e for e in profile.experts if e not in baselines] + baselines
    return [(m, o) for m in merges for o in others]


def comparison_statements(comparisons: list, pairs: list) -> list[str]:
    """One line per merge with its detectable differences; one line for all merges with none."""
    lines, quiet = [], []
    merges = list(dict.fromkeys(a for a, _ in pairs))
    for merge in merges:
        mine = [c for c in comparisons if c["a"] == merge]
        found = [c for c in mine if c["verdict"] != "tie"]
        if not found:
            quiet.append(merge)
            continue
        rest = len(mine) - len(found)
        found_text = "; ".join(f"vs {c['b']}, {describe_comparison(c)}: {c['verdict']}" for c in found)
        lines.append(f"**{merge}**: {found_text}"
                     + (f"; no detectable difference in its {rest} other comparisons" if rest else "") + ".")
    if quiet and comparisons:
        others = list(dict.fromkeys(b for a, b in pairs if a in quiet))
        lines.append(f"{', '.join(quiet)}: no detectable difference from {', '.join(others)} on any paired metric "
                     f"(solution NLL: paired bootstrap 95% interval; accuracy: McNemar exact p < 0.05).")
    return lines


def run_verdicts(loaded, table: dict) -> dict:
    """The verdict of a run's evaluation table: which model is recommended, and by which rule."""
    return verdicts(table["rows"], loaded.language.code)


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
    pairs = comparison_pairs(profile)
    comparisons = compare_models(table, pairs)
    verdict["statements"] += comparison_statements(comparisons, pairs)
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
        "baselines": list(profile.eval.baselines),
        "comparisons": comparisons,
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
    out += comparisons_section(body.get("comparisons") or [])
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


def comparisons_section(comparisons: list) -> list:
    """Every paired comparison as a table row: a - b with its 95% interval, n, McNemar's p, the verdict."""
    if not comparisons:
        return []
    out = ["## Paired comparisons", "",
           "Each merge against each expert and baseline, item by item on the same problems: a - b in solution "
           "NLL (nats per token where both models cut the solutions into the same tokens, else bits per "
           "character of the solution, marked bits/char; paired bootstrap 95% interval, lower is better) and in "
           "accuracy (points; paired bootstrap 95% interval and McNemar's exact p).", "",
           "| a | b | metric | a - b [95%] | n | p | verdict |", "| --- | --- | --- | --- | ---: | ---: | --- |"]
    for c in comparisons:
        scale, unit = (1, ".3f") if c["kind"] == "solution_nll" else (100, ".1f")
        cell = f"{scale * c['difference']:+{unit}} [{scale * c['low']:+{unit}}, {scale * c['high']:+{unit}}]"
        cell += " bits/char" if c.get("unit") == "bits/char" else ""
        p = f"{c['p']:.3g}" if "p" in c else ""
        out.append(f"| {c['a']} | {c['b']} | {c['metric']} | {cell} | {c['n']} | {p} | {c['verdict']} |")
    return out + [""]


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
