"""Paired comparisons of evaluated models, item by item on the same problems: a paired bootstrap 95% interval
of the solution-NLL difference, and McNemar's exact test (with a paired bootstrap interval) for accuracy.

Reads the per-item records the evaluation wrote (`results.json` names them under files.predictions) and pairs
items by their `source`. An entry:

    {"a", "b", "metric" (the table column), "kind" ("solution_nll" | "accuracy"), "difference" (a - b: NLL in
     `unit`, accuracy as a fraction), "low", "high" (95%), "n" (paired items),
     "unit" (solution NLL: "nats/token" or "bits/char"),
     "p", "a_only", "b_only" (accuracy: McNemar's exact p and the discordant pairs), "verdict"}

Solution NLL is compared per token when the two models cut every shared solution into the same number of
tokens (the same tokenizer, in practice), and per character of the solution otherwise: a model with an
extended vocabulary scores fewer, longer tokens, so its per-token NLL is not on the base model's scale.

verdict: "better" or "worse" (for a, against b) when the difference is detectable (NLL: the interval excludes
0; accuracy: McNemar p < 0.05), else "tie".
"""
import json
from pathlib import Path

from workbench.errors import DataError
from workbench.evaluation.paired import mcnemar_exact, paired_bootstrap

ALPHA = 0.05
PAIRED_KINDS = ("solution_nll", "accuracy")


def read_items(path) -> dict:
    """{source: record} of one model's per-item JSONL file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the per-item evaluation records: {e.strerror or e}") from None
    return {r["source"]: r for r in map(json.loads, filter(None, lines))}


def _verdict(kind: str, result: dict) -> str:
    if kind == "solution_nll":
        # Lower NLL is better: a is better when the whole interval of a - b is below 0.
        return "better" if result["high"] < 0 else "worse" if result["low"] > 0 else "tie"
    if result["p"] < ALPHA:
        return "better" if result["difference"] > 0 else "worse"
    return "tie"


def compare_pair(a_items: dict, b_items: dict, kind: str) -> dict:
    """One paired comparison of two models' records on one task, over the items both have."""
    shared = [s for s in a_items if s in b_items]
    if kind == "solution_nll":
        per_token = all(a_items[s].get("tokens") == b_items[s].get("tokens") for s in shared)
        key, unit = ("nll", "nats/token") if per_token or not _have_bpc(a_items, b_items, shared) else \
            ("bits_per_char", "bits/char")
        result = {**paired_bootstrap([a_items[s][key] for s in shared], [b_items[s][key] for s in shared]),
                  "unit": unit}
    else:
        a_ok = [bool(a_items[s]["correct"]) for s in shared]
        b_ok = [bool(b_items[s]["correct"]) for s in shared]
        result = {**paired_bootstrap([float(x) for x in a_ok], [float(y) for y in b_ok]),
                  **mcnemar_exact(a_ok, b_ok)}
    return {**result, "verdict": _verdict(kind, result) if result["n"] else "tie"}


def _have_bpc(a_items: dict, b_items: dict, shared: list) -> bool:
    """Whether both models' records carry bits per character (records written before it do not)."""
    return all("bits_per_char" in a_items[s] and "bits_per_char" in b_items[s] for s in shared)


def compare_models(table: dict, pairs: list) -> list[dict]:
    """Every (a, b) in `pairs` on every solution-NLL and accuracy column of an evaluation table both models
    have per-item records for."""
    files = table.get("files", {}).get("predictions", {})
    cache = {}

    def items(model, metric):
        if (model, metric) not in cache:
            path = files.get(model, {}).get(metric)
            cache[model, metric] = read_items(path) if path else None
        return cache[model, metric]

    out = []
    for a, b in pairs:
        for metric, spec in table["columns"].items():
            if spec["kind"] not in PAIRED_KINDS:
                continue
            a_items, b_items = items(a, metric), items(b, metric)
            if a_items is None or b_items is None:
                continue
            out.append({"a": a, "b": b, "metric": metric, "kind": spec["kind"],
                        **compare_pair(a_items, b_items, spec["kind"])})
    return out


def describe_comparison(entry: dict) -> str:
    """"nll_generated_sw: -0.410 [-0.520, -0.300]" or "generated_en: +15.0 points [5.0, 25.0], McNemar p=0.031"."""
    if entry["kind"] == "solution_nll":
        unit = " bits/char" if entry.get("unit") == "bits/char" else ""
        return f"{entry['metric']}: {entry['difference']:+.3f}{unit} [{entry['low']:+.3f}, {entry['high']:+.3f}]"
    return (f"{entry['metric']}: {100 * entry['difference']:+.1f} points [{100 * entry['low']:+.1f}, "
            f"{100 * entry['high']:+.1f}], McNemar p={entry['p']:.3g}")
