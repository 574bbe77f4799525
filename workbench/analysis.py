"""Delta magnitudes per layer and module kind (docs/design.md §4.1): the heatmap Layer Swapping reads.

One fused pass over base and expert per tensor (the `delta_stats` kernel, batched so that small tensors
share a launch); δ never exists for a whole tensor. The relative change of a group of tensors is
‖δ‖₂/‖θ_b‖₂ over the group: sqrt(Σ Σδ²) / sqrt(Σ Σθ_b²).
"""
import json
import math
from pathlib import Path

from workbench.checkpoint import check_compatible, ModelReader
from workbench.kernels.delta_stats import delta_stats
from workbench.merge.layers import KINDS, num_layers, place_of


BATCH_BYTES = 64 * 1024 * 1024  # small tensors are gathered into one kernel call up to this size


def expert_delta_stats(base: ModelReader, expert: ModelReader, names, progress=None) -> dict:
    """{name: DeltaStats} of expert − base for `names`, streaming the tensors (shared rows only when the
    expert's vocabulary is extended)."""
    out, batch, size = {}, [], 0

    def flush():
        nonlocal batch, size
        pairs = []
        for name in batch:
            b, e = base.get(name), expert.get(name)
            if e.shape != b.shape:  # an extended vocabulary: compare the shared rows [0, V)
                e = e[: b.shape[0]]
            pairs.append((b, e))
        for name, stats in zip(batch, delta_stats(pairs)):
            out[name] = stats
        for name in batch:
            base.release(name)
            expert.release(name)
            if progress is not None:
                progress(name)
        batch, size = [], 0

    for name in names:
        batch.append(name)
        size += base.spec(name).nbytes
        if size >= BATCH_BYTES:
            flush()
    if batch:
        flush()
    return out


def _rel(sum_sq, base_sq):
    if base_sq > 0:
        return math.sqrt(sum_sq) / math.sqrt(base_sq)
    return 0.0 if sum_sq == 0 else math.inf


def layer_profile(stats: dict) -> dict:
    """Aggregate per-tensor stats into the heatmap: relative change per (layer, module kind) and per layer,
    plus the tensors outside the layers (embeddings, final norm, LM head) and totals."""
    names = list(stats)
    n_layers = num_layers(names)
    cells = {}  # (layer or kind-row, kind) -> [sum_sq, base_sq]
    per_layer = [[0.0, 0.0] for _ in range(n_layers)]
    outside = {}
    total = [0.0, 0.0, 0.0, 0, 0]  # sum_sq, base_sq, sum_abs, numel, nonfinite
    max_abs = 0.0
    for name, s in stats.items():
        place = place_of(name)
        total[0] += s.sum_sq
        total[1] += s.base_sum_sq
        total[2] += s.sum_abs
        total[3] += s.numel
        total[4] += s.nonfinite
        max_abs = max(max_abs, s.max_abs)
        if place.layer is None:
            acc = outside.setdefault(place.kind, [0.0, 0.0])
        else:
            acc = cells.setdefault((place.layer, place.kind), [0.0, 0.0])
            per_layer[place.layer][0] += s.sum_sq
            per_layer[place.layer][1] += s.base_sum_sq
        acc[0] += s.sum_sq
        acc[1] += s.base_sum_sq
    kinds = [k for k in KINDS if any(key[1] == k for key in cells)]
    grid = [[_rel(*cells[(layer, k)]) if (layer, k) in cells else None for k in kinds] for layer in range(n_layers)]
    return {
        "num_layers": n_layers,
        "kinds": kinds,
        "relative_change": grid,  # [layer][kind]
        "layer_relative_change": [_rel(*acc) for acc in per_layer],
        "outside_layers": {k: _rel(*acc) for k, acc in outside.items()},
        "total": {"relative_change": _rel(total[0], total[1]), "mean_abs_delta": total[2] / max(total[3], 1),
                  "max_abs_delta": max_abs, "numel": total[3], "nonfinite": total[4]},
    }


def analyze_models(base_dir, experts: dict, *, progress=None) -> dict:
    """{label: layer_profile} for each expert directory against the base directory."""
    readers = {"base": ModelReader(base_dir)}
    readers.update({label: ModelReader(path) for label, path in experts.items()})
    try:
        ext = extended_label(readers)
        report = check_compatible(readers, extended_vocab=ext)
        profiles = {}
        for label in experts:
            stats = expert_delta_stats(readers["base"], readers[label], report.names, progress=progress)
            profiles[label] = layer_profile(stats)
        return profiles
    finally:
        for r in readers.values():
            r.close()


def extended_label(readers: dict):
    """The one model whose vocabulary is larger than the others' (docs/design.md §4.6a), or None."""
    sizes = {label: r.config.get("vocab_size") for label, r in readers.items()}
    known = [v for v in sizes.values() if v is not None]
    if not known or len(set(known)) == 1:
        return None
    largest = max(known)
    bigger = [label for label, v in sizes.items() if v == largest]
    return bigger[0] if len(bigger) == 1 else None


def plot_heatmap(profiles: dict, path, title="Relative change ‖δ‖/‖θ_b‖ per layer and module"):
    """One panel per expert: layers (rows, bottom layer at the bottom) × module kinds (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(profiles)
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels) + 1.2, 0.22 * max(
        p["num_layers"] for p in profiles.values()) + 2.2), squeeze=False)
    vmax = max((v for p in profiles.values() for row in p["relative_change"] for v in row
                if v is not None and math.isfinite(v)), default=1.0) or 1.0
    image = None
    for ax, label in zip(axes[0], labels):
        p = profiles[label]
        grid = np.array([[np.nan if v is None else v for v in row] for row in p["relative_change"]], dtype=float)
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(label)
        ax.set_xticks(range(len(p["kinds"])))
        ax.set_xticklabels(p["kinds"], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="‖δ‖ / ‖θ_b‖")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def write_analysis(profiles: dict, out_dir, suggestion=None) -> dict:
    """delta_profile.json and delta_heatmap.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = {"experts": profiles, "suggested_swap": suggestion}
    (out / "delta_profile.json").write_text(json.dumps(body, indent=2, default=str) + "\n", encoding="utf-8")
    plot_heatmap(profiles, out / "delta_heatmap.png")
    return {"json": str(out / "delta_profile.json"), "heatmap": str(out / "delta_heatmap.png")}
