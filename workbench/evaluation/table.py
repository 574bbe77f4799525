"""One table across models (Markdown and JSON) and a bar chart with the intervals.

The table is `{"columns": {metric: {"kind", ...}}, "rows": {model: {metric: record}}}` where a record is
- accuracy: {"kind": "accuracy", "accuracy", "low", "high" (Wilson 95%), "correct", "n", "no_answer"};
- perplexity: {"kind": "perplexity", "perplexity", "nll", "tokens", "documents", "characters", "bits_per_char"};
- solution_nll: {"kind": "solution_nll", "mean", "low", "high" (normal 95%), "n", "tokens", "characters",
  "bits_per_char": {"mean", "low", "high"}}: the mean over items of each gold solution's per-token NLL given
  the prompt, and of the same in bits per character (`likelihood.py`);
- lm_eval: {"kind": "lm_eval", "metric", "value", "stderr"} (lm-eval's own numbers).
"""
import math
from pathlib import Path

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp: at p = 0 or 1 rounding can put the bound a hair past p.
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


def accuracy_record(correct: int, n: int, no_answer: int = 0) -> dict:
    low, high = wilson_interval(correct, n)
    return {"kind": "accuracy", "accuracy": correct / n if n else float("nan"), "low": low, "high": high,
            "correct": correct, "n": n, "no_answer": no_answer}


def _cell(record: dict | None) -> str:
    if record is None:
        return "–"
    kind = record["kind"]
    if kind == "accuracy":
        return (f"{100 * record['accuracy']:.1f} [{100 * record['low']:.1f}, {100 * record['high']:.1f}] "
                f"({record['correct']}/{record['n']})")
    if kind == "perplexity":
        bpc = record.get("bits_per_char")
        return f"{record['perplexity']:.2f}" + (f" ({bpc:.3f} bpc)" if bpc is not None else "")
    if kind == "solution_nll":
        bpc = record.get("bits_per_char")
        return (f"{record['mean']:.3f} [{record['low']:.3f}, {record['high']:.3f}] (n={record['n']}"
                + (f"; {bpc['mean']:.3f} bpc" if isinstance(bpc, dict) else "") + ")")
    stderr = record.get("stderr")
    return f"{record['value']:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")


def markdown_table(table: dict) -> str:
    """Models as rows, metrics as columns; accuracies in % with their Wilson 95% interval and counts."""
    columns = list(table["columns"])
    head = "| model | " + " | ".join(columns) + " |"
    rule = "| --- | " + " | ".join("---" for _ in columns) + " |"
    rows = [f"| {model} | " + " | ".join(_cell(metrics.get(c)) for c in columns) + " |"
            for model, metrics in table["rows"].items()]
    notes = []
    kinds = {spec["kind"] for spec in table["columns"].values()}
    if "accuracy" in kinds:
        notes.append("Accuracy in %, [Wilson 95% interval], (correct/total).")
    if "solution_nll" in kinds:
        notes.append("nll_*: solution NLL, the mean per-token NLL (nats) of the gold worked solution given the "
                     "prompt, [95% interval], (items; bpc: the same in bits per character of the solution, which "
                     "compares models whose tokenizers differ): lower is better.")
    if "perplexity" in kinds:
        notes.append("Perplexity: per token, lower is better; (bpc): bits per character of the same text, which "
                     "compares models whose tokenizers differ (an extended vocabulary against the base).")
    if "lm_eval" in kinds:
        notes.append("lm-eval tasks: value ± lm-eval's standard error.")
    return "\n".join([head, rule, *rows, "", *notes]) + "\n"


def nll_per_character(table: dict) -> bool:
    """Whether solution NLL is drawn in bits per character: when the models scored different numbers of tokens
    on some set (their tokenizers differ) and every record has it."""
    records = [row.get(c) for row in table["rows"].values()
               for c, spec in table["columns"].items() if spec["kind"] == "solution_nll"]
    records = [r for r in records if r]
    differ = any(len({row[c].get("tokens") for row in table["rows"].values() if row.get(c)}) > 1
                 for c, spec in table["columns"].items() if spec["kind"] == "solution_nll")
    return bool(records) and differ and all(isinstance(r.get("bits_per_char"), dict) for r in records)


def plot_table(table: dict, path) -> Path:
    """A bar chart PNG: accuracies (with Wilson intervals) and 0-1 lm-eval scores in one panel, solution NLLs
    (with their intervals) beside them in the next, perplexities (values written on the bars) in the last."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    models = list(table["rows"])
    scored = [c for c, spec in table["columns"].items() if spec["kind"] in ("accuracy", "lm_eval")]
    nll = [c for c, spec in table["columns"].items() if spec["kind"] == "solution_nll"]
    ppl = [c for c, spec in table["columns"].items() if spec["kind"] == "perplexity"]
    bpc = all("bits_per_char" in (row.get(c) or {"bits_per_char": 0}) for row in table["rows"].values() for c in ppl)
    nll_bpc = nll_per_character(table)
    panels = [p for p in (scored, nll, ppl) if p]
    fig = Figure(figsize=(max(6.0, 1.2 * len(models) * max(len(p) for p in panels) + 2), 4.2 * len(panels)),
                 layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(models))
    for ax, metrics in zip(axes, panels):
        for j, model in enumerate(models):
            xs, ys, errs = [], [], [[], []]
            for i, metric in enumerate(metrics):
                value, low, high = _bar(table["rows"][model].get(metric),
                                        bpc and metrics is ppl or nll_bpc and metrics is nll)
                if value is None:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(value)
                errs[0].append(value - low)
                errs[1].append(high - value)
            bars = ax.bar(xs, ys, width=width * 0.95, yerr=None if metrics is ppl else errs, capsize=3,
                          label=model)
            if metrics is ppl:
                ax.bar_label(bars, fmt="%.2f" if bpc else "%.1f", fontsize="small")
        ax.set_xticks(range(len(metrics)), metrics, rotation=15 if len(metrics) > 3 else 0)
        if metrics is ppl:
            ax.set_ylabel("bits per character (lower is better)" if bpc else "perplexity (lower is better)")
        elif metrics is nll:
            ax.set_ylabel(f"solution NLL, {'bits/char' if nll_bpc else 'nats/token'} (95% interval; lower is better)")
        else:
            ax.set_ylabel("accuracy % (Wilson 95% interval)")
            ax.set_ylim(0, 100)
        ax.legend(fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _bar(record, bpc=False) -> tuple:
    """(value, low, high) of a record on its panel's scale; Nones when absent."""
    if record is None:
        return None, None, None
    if record["kind"] == "accuracy":
        return 100 * record["accuracy"], 100 * record["low"], 100 * record["high"]
    if record["kind"] == "perplexity":  # bits per character where every model has it: it compares across tokenizers
        v = record["bits_per_char"] if bpc else record["perplexity"]
        return (v, v, v) if math.isfinite(v) else (None, None, None)  # no interval: drawn without error bars
    if record["kind"] == "solution_nll":
        per_char = record.get("bits_per_char") if bpc else None
        v, low, high = (per_char["mean"], per_char["low"], per_char["high"]) if per_char else \
            (record["mean"], record["low"], record["high"])
        if not math.isfinite(v):
            return None, None, None
        return (v, low, high) if math.isfinite(low) else (v, v, v)
    if not 0 <= record["value"] <= 1:  # an lm-eval metric off the 0-1 scale (e.g. word_perplexity): table only
        return None, None, None
    v, se = 100 * record["value"], 100 * (record.get("stderr") or 0.0)
    return v, max(0.0, v - Z95 * se), min(100.0, v + Z95 * se)
