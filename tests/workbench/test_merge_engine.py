"""The merge engine on real tiny Llama models: each recipe equals its formula on whole state dicts.

The reference formulas here are written independently of the kernels (TIES trims with torch.topk).
Tolerance: the engine and the reference both compute in fp32 and round to the storage dtype once; sums
may be taken in a different order, so a bf16 result may differ by one bf16 step (2^-8 relative):
rtol 1e-2, atol 1e-4 for bf16 and rtol 1e-5, atol 1e-6 for fp32.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from workbench.errors import ConfigError, IncompatibleModelsError, NonFiniteError
from workbench.merge.engine import load_recipe, resolve_paths, run_merge
from workbench.merge.layer_swap import layer_alphas

TOL = {torch.bfloat16: dict(rtol=1e-2, atol=1e-4), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def state_of(model_dir):
    files = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors")
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def merge(tmp_path, recipe_dict, name="out", **kwargs):
    recipe_file = tmp_path / f"{name}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_dict), encoding="utf-8")
    recipe, base_dir = load_recipe(recipe_file)
    result = run_merge(recipe, resolve_paths(recipe, base_dir), tmp_path / name, progress=False, **kwargs)
    return result, state_of(result.out_dir)


def top_count(fraction, n):
    """mergekit's count: ⌊k·n⌋ in float64, at least 1."""
    return max(1, int(fraction * n))


def top_mask(delta, fraction):
    """The ⌊k·n⌋ largest |δ|, ties at the threshold by position (a stable descending sort)."""
    mag = delta.abs().flatten()
    if fraction >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    order = torch.sort(mag, descending=True, stable=True).indices[:top_count(fraction, mag.numel())]
    return torch.zeros_like(mag, dtype=torch.bool).index_fill_(0, order, True).view(delta.shape)


def ties_reference(base, experts, weights, densities, slacks=None, lam=1.0):
    """Yadav et al. (2023) trim/elect/disjoint-merge, with TIES-SV's protected vote (docs/design.md §4.5)."""
    slacks = slacks or [0.0] * len(experts)
    b = base.float()
    deltas = [e.float() - b for e in experts]
    keeps = [top_mask(d, k) for d, k in zip(deltas, densities)]
    protects = [top_mask(d, s) if s > 0 else torch.zeros_like(d, dtype=torch.bool) for d, s in zip(deltas, slacks)]
    elected = torch.sign(sum(w * d * m for w, d, m in zip(weights, deltas, keeps)))
    protected_vote = torch.sign(sum(w * d * m for w, d, m in zip(weights, deltas, protects)))
    elected = torch.where(protected_vote != 0, protected_vote, elected)
    num = torch.zeros_like(b)
    den = torch.zeros_like(b)
    for w, d, keep in zip(weights, deltas, keeps):
        agree = keep & (torch.sign(d) == elected) & (elected != 0)
        num += torch.where(agree, w * d, 0.0)
        den += torch.where(agree, torch.full_like(d, w), 0.0)
    merged = torch.where(den > 0, num / den.clamp_min(1e-30), 0.0)
    return (b + lam * merged).to(base.dtype)


@pytest.fixture
def bf16_family(tiny_llama_factory):
    base_dir, base = tiny_llama_factory("base", seed=0, dtype=torch.bfloat16)
    lang_dir, lang = tiny_llama_factory("lang", seed=1, base_state=base, delta_scale=0.02, dtype=torch.bfloat16,
                                        layer_scales=[3.0, 1.0, 0.5, 2.5])
    task_dir, task = tiny_llama_factory("task", seed=2, base_state=base, delta_scale=0.02, dtype=torch.bfloat16,
                                        layer_scales=[0.5, 2.0, 2.0, 0.5])
    return {"base": (base_dir, base), "lang": (lang_dir, lang), "task": (task_dir, task)}


def test_task_arithmetic_and_linear_equal_their_formulas(tmp_path, bf16_family):
    (b_dir, b), (l_dir, l), (t_dir, t) = bf16_family["base"], bf16_family["lang"], bf16_family["task"]
    _, ta = merge(tmp_path, {"method": "task_arithmetic", "base": str(b_dir), "lambda": 0.8,
                             "models": [{"model": str(l_dir), "weight": 0.7}, {"model": str(t_dir)}]}, "ta")
    _, lin = merge(tmp_path, {"method": "linear", "models": [{"model": str(l_dir), "weight": 3},
                                                            {"model": str(t_dir), "weight": 1}]}, "lin")
    for name in b:
        expect = (b[name].float() + 0.8 * (0.7 * (l[name].float() - b[name].float())
                                           + (t[name].float() - b[name].float()))).to(torch.bfloat16)
        torch.testing.assert_close(ta[name], expect, **TOL[torch.bfloat16])
        torch.testing.assert_close(lin[name], ((3 * l[name].float() + t[name].float()) / 4).to(torch.bfloat16),
                                   **TOL[torch.bfloat16])


def test_ties_and_ties_sv_equal_the_reference(tmp_path, bf16_family):
    (b_dir, b), (l_dir, l), (t_dir, t) = bf16_family["base"], bf16_family["lang"], bf16_family["task"]
    res, ties = merge(tmp_path, {"method": "ties", "base": str(b_dir), "models": [
        {"model": str(l_dir), "density": 0.3}, {"model": str(t_dir), "density": 0.4}]}, "ties")
    res_sv, sv = merge(tmp_path, {"method": "ties_sv", "base": str(b_dir), "models": [
        {"model": str(l_dir), "density": 0.3}, {"model": str(t_dir), "density": 0.4, "slack": 0.2}]}, "sv")
    for name in b:
        torch.testing.assert_close(ties[name], ties_reference(b[name], [l[name], t[name]], [1, 1], [0.3, 0.4]),
                                   **TOL[torch.bfloat16])
        torch.testing.assert_close(sv[name], ties_reference(b[name], [l[name], t[name]], [1, 1], [0.3, 0.4],
                                                            [0.0, 0.2]), **TOL[torch.bfloat16])
    experts = res.report["experts"]
    assert [e["model"] for e in experts] == [str(l_dir), str(t_dir)]
    numel = sum(b[n].numel() for n in b)
    assert experts[0]["kept"] == sum(top_count(0.3, b[n].numel()) for n in b)    # exactly ⌊k·n⌋ per tensor
    assert experts[0]["kept_fraction"] == experts[0]["kept"] / numel
    assert 0 < experts[1]["kept_entered_share"] < 1 and experts[1]["protected_entered_share"] is None
    lang, task = res_sv.report["experts"]
    assert task["protected"] == sum(top_count(0.2, b[n].numel()) for n in b) and lang["protected"] == 0
    assert task["protected_entered_share"] == 1.0          # only the task expert's vote decides there
    assert task["protected_entered_share_without_slack"] < 1.0
    assert task["kept_entered_share_without_slack"] == experts[1]["kept_entered_share"]    # = plain TIES


def test_ties_sv_with_zero_slack_writes_the_same_bytes_as_ties(tmp_path, bf16_family):
    (b_dir, _), (l_dir, _), (t_dir, _) = bf16_family["base"], bf16_family["lang"], bf16_family["task"]
    models = [{"model": str(l_dir), "density": 0.25}, {"model": str(t_dir), "density": 0.5}]
    a, _ = merge(tmp_path, {"method": "ties", "base": str(b_dir), "models": models}, "a")
    b, _ = merge(tmp_path, {"method": "ties_sv", "base": str(b_dir), "models": models}, "b")
    weights = sorted(p.name for p in a.out_dir.iterdir() if p.name not in ("README.md", "merge_report.json"))
    assert weights == sorted(p.name for p in b.out_dir.iterdir() if p.name not in ("README.md", "merge_report.json"))
    for fname in weights:
        assert (a.out_dir / fname).read_bytes() == (b.out_dir / fname).read_bytes(), fname


def test_model_scope_ranks_all_trimmed_tensors_together(tmp_path, bf16_family):
    (b_dir, b), (l_dir, l), (t_dir, t) = bf16_family["base"], bf16_family["lang"], bf16_family["task"]
    res, out = merge(tmp_path, {"method": "ties", "base": str(b_dir), "scope": "model", "models": [
        {"model": str(l_dir), "density": 0.2}, {"model": str(t_dir), "density": 0.2}]}, "scope")
    pool = [n for n in b if "embed_tokens" not in n and "lm_head" not in n]
    taus, counts = [], []
    for e in (l, t):
        mags = torch.cat([(e[n].float() - b[n].float()).abs().flatten() for n in pool])
        counts.append(top_count(0.2, mags.numel()))
        taus.append(float(torch.topk(mags, counts[-1]).values[-1]))
    got = res.report["model_scope_thresholds"]
    assert [got[str(l_dir)]["tau_keep"], got[str(t_dir)]["tau_keep"]] == taus
    kept = [sum(r["kept"][i] for n, r in res.report["tensors"].items() if n in pool) for i in range(2)]
    assert kept == counts                                  # exactly ⌊k·n⌋ over the whole pool
    kept_layers = {r["kept_fraction"][0] for n, r in res.report["tensors"].items() if n in pool}
    assert len(kept_layers) > 1  # one global threshold keeps different shares of different tensors


def test_layer_swap_copies_blends_and_keeps(tmp_path, tiny_llama_factory):
    base_dir, base = tiny_llama_factory("base", seed=0, layers=6)
    lang_dir, lang = tiny_llama_factory("lang", seed=1, layers=6, base_state=base, delta_scale=0.05)
    task_dir, task = tiny_llama_factory("task", seed=2, layers=6, base_state=base, delta_scale=0.05)
    res, out = merge(tmp_path, {"method": "layer_swap", "base": str(base_dir), "layer_swap": {
        "task": str(task_dir), "language": str(lang_dir), "bottom": 2, "top": 1, "transition": 1,
        "embeddings": "task", "lm_head": "language", "final_norm": "base"}}, "swap")
    alphas = layer_alphas(6, 2, 1, 1)
    assert alphas == [1, 1, 0.5, 0, 0.5, 1]
    for name, value in out.items():
        if ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            a = alphas[layer]
            if a == 1:
                assert torch.equal(value, lang[name]), name
            elif a == 0:
                assert torch.equal(value, task[name]), name
            else:
                torch.testing.assert_close(value, (1 - a) * task[name] + a * lang[name], rtol=1e-6, atol=1e-7)
    assert torch.equal(out["model.embed_tokens.weight"], task["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], lang["lm_head.weight"])
    assert torch.equal(out["model.norm.weight"], base["model.norm.weight"])
    assert res.report["layer_swap"]["alphas"] == alphas
    model = AutoModelForCausalLM.from_pretrained(res.out_dir)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9, 42]])).logits).all()


def test_copies_are_checked_and_written_in_parts_with_the_same_bytes(tmp_path, tiny_llama_factory, monkeypatch):
    # A copied tensor is checked for NaN/Inf and written part by part, each part's input pages dropped
    # behind it (so a big embedding is never resident whole). With parts of 4 KiB, the tiny model's copies
    # take that path: the output bytes equal those of whole-tensor copies, and NaNs spread over several
    # parts are all counted.
    import workbench.checkpoint.writer as writer_module
    import workbench.merge.engine as engine_module
    from safetensors.torch import save_file
    from workbench.merge.staging import Inputs

    base_dir, base = tiny_llama_factory("base", seed=0, layers=6)
    lang_dir, lang = tiny_llama_factory("lang", seed=1, layers=6, base_state=base, delta_scale=0.05)
    task_dir, task = tiny_llama_factory("task", seed=2, layers=6, base_state=base, delta_scale=0.05)
    recipe = {"method": "layer_swap", "base": str(base_dir), "layer_swap": {
        "task": str(task_dir), "language": str(lang_dir), "bottom": 2, "top": 1, "transition": 1,
        "embeddings": "task", "lm_head": "language", "final_norm": "base"}}
    whole, _ = merge(tmp_path, recipe, "whole")
    released = []
    real_release = Inputs.release_part
    monkeypatch.setattr(engine_module, "PART_BYTES", 4096)
    monkeypatch.setattr(writer_module, "PART_BYTES", 4096)
    monkeypatch.setattr(Inputs, "release_part",
                        lambda self, op, ref, a, b: (released.append((op.name, a, b)), real_release(self, op, ref, a, b)))
    parts, _ = merge(tmp_path, recipe, "parts")
    assert (whole.out_dir / "model.safetensors").read_bytes() == (parts.out_dir / "model.safetensors").read_bytes()
    embed = "model.embed_tokens.weight"
    nbytes = task[embed].numel() * task[embed].element_size()
    assert nbytes > 3 * 4096
    spans = sorted((a, b) for name, a, b in released if name == embed)
    assert spans[0][0] == 0 and max(b for _, b in spans) == nbytes and all(b - a <= 4096 for a, b in spans)

    poisoned = {k: v.clone() for k, v in task.items()}
    flat = poisoned[embed].view(-1)
    flat[[5, 4096, flat.numel() - 1]] = float("nan")      # in the first, a middle and the last part
    save_file(poisoned, str(task_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=r"tensor model\.embed_tokens\.weight of model .*: 3 NaN/Inf"):
        merge(tmp_path, recipe, "nan")


def test_layer_swap_auto_uses_the_delta_heatmap(tmp_path, tiny_llama_factory):
    base_dir, base = tiny_llama_factory("base", seed=0, layers=6)
    # The language expert changed the bottom two and the top layer most; the task expert the middle.
    lang_dir, _ = tiny_llama_factory("lang", seed=1, layers=6, base_state=base, delta_scale=0.02,
                                     layer_scales=[4, 4, 0.2, 0.2, 0.2, 4])
    task_dir, _ = tiny_llama_factory("task", seed=2, layers=6, base_state=base, delta_scale=0.02,
                                     layer_scales=[1, 1, 3, 3, 3, 1])
    res, _ = merge(tmp_path, {"method": "layer_swap", "base": str(base_dir), "layer_swap": {
        "task": str(task_dir), "language": str(lang_dir), "bottom": "auto", "top": "auto"}}, "auto")
    swap = res.report["layer_swap"]
    assert (swap["bottom"], swap["top"]) == (2, 1) and swap["chosen_by"] == {"bottom": "auto", "top": "auto"}


def test_merged_model_loads_and_gives_finite_logits(tmp_path, tiny_family):
    (b_dir, _), (l_dir, _), (t_dir, _) = tiny_family["base"], tiny_family["language"], tiny_family["task"]
    res, _ = merge(tmp_path, {"method": "dare_ties", "base": str(b_dir), "seed": 7, "models": [
        {"model": str(l_dir), "density": 0.5}, {"model": str(t_dir), "density": 0.5}]}, "dare",
        max_shard_bytes=100_000)
    assert (res.out_dir / "model.safetensors.index.json").is_file()
    assert (res.out_dir / "tokenizer.json").is_file() and (res.out_dir / "README.md").is_file()
    model = AutoModelForCausalLM.from_pretrained(res.out_dir)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9, 42]])).logits).all()
    again, _ = merge(tmp_path, {"method": "dare_ties", "base": str(b_dir), "seed": 7, "models": [
        {"model": str(l_dir), "density": 0.5}, {"model": str(t_dir), "density": 0.5}]}, "dare2",
        max_shard_bytes=100_000)
    shards = sorted(p.name for p in res.out_dir.glob("*.safetensors"))
    assert all((res.out_dir / f).read_bytes() == (again.out_dir / f).read_bytes() for f in shards)


def test_mismatched_experts_fail_before_any_output(tmp_path, tiny_llama_factory):
    base_dir, base = tiny_llama_factory("base", seed=0)
    wide_dir, _ = tiny_llama_factory("wide", seed=1, intermediate=192)
    short_dir, _ = tiny_llama_factory("short", seed=2, layers=3)
    with pytest.raises(IncompatibleModelsError) as err:
        merge(tmp_path, {"method": "ties", "base": str(base_dir), "models": [
            {"model": str(wide_dir), "density": 0.5}, {"model": str(short_dir), "density": 0.5}]}, "bad")
    text = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in text and "model.layers.3.mlp.up_proj.weight" in text
    assert "intermediate_size" in text and "num_hidden_layers" in text
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_nonfinite_input_is_reported_by_name(tmp_path, tiny_llama_factory):
    from safetensors.torch import save_file

    base_dir, base = tiny_llama_factory("base", seed=0)
    exp_dir, exp = tiny_llama_factory("exp", seed=1, base_state=base, delta_scale=0.02)
    poisoned = dict(exp)
    poisoned["model.layers.1.self_attn.k_proj.weight"] = poisoned["model.layers.1.self_attn.k_proj.weight"].clone()
    poisoned["model.layers.1.self_attn.k_proj.weight"][0, :3] = float("nan")
    save_file({k: v.contiguous() for k, v in poisoned.items()}, str(exp_dir / "model.safetensors"),
              metadata={"format": "pt"})
    recipe = {"method": "task_arithmetic", "base": str(base_dir), "models": [{"model": str(exp_dir)}]}
    with pytest.raises(NonFiniteError, match=r"tensor model\.layers\.1\.self_attn\.k_proj\.weight: NaN/Inf"):
        merge(tmp_path, recipe, "nan")
    assert not (tmp_path / "nan").exists()
    res, out = merge(tmp_path, recipe, "nan_ok", allow_nonfinite=True)
    assert res.report["nonfinite_total"] == 3
    w = out["model.layers.1.self_attn.k_proj.weight"]
    assert torch.isfinite(w).all()
    assert torch.equal(w[0, :3], base["model.layers.1.self_attn.k_proj.weight"][0, :3])


def test_extended_vocabulary_merges_shared_rows_and_keeps_new_ones(tmp_path, tiny_llama_factory,
                                                                   extend_tokenizer):
    base_dir, base = tiny_llama_factory("base", seed=0)
    task_dir, task = tiny_llama_factory("task", seed=2, base_state=base, delta_scale=0.02)
    # The language expert: the base with 16 more vocabulary rows, then trained (noise).
    big_dir, big = tiny_llama_factory("big", seed=3, vocab_size=528)
    grown = {k: v.clone() for k, v in base.items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[name] = torch.cat([base[name], big[name][512:]])
    lang_dir, lang = tiny_llama_factory("lang", seed=4, vocab_size=528, base_state=grown, delta_scale=0.02)
    extend_tokenizer(lang_dir, 16)  # its tokenizer proves the extension
    res, out = merge(tmp_path, {"method": "task_arithmetic", "base": str(base_dir), "models": [
        {"model": str(lang_dir)}, {"model": str(task_dir)}]}, "ext")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape[0] == 528
        expect = base[name] + (lang[name][:512] - base[name]) + (task[name] - base[name])
        torch.testing.assert_close(out[name][:512], expect, rtol=1e-5, atol=1e-6)
        assert torch.equal(out[name][512:], lang[name][512:])
    assert res.report["output"]["extended_vocab"] == str(lang_dir)
    assert AutoModelForCausalLM.from_pretrained(res.out_dir).config.vocab_size == 528
    other_dir, _ = tiny_llama_factory("other", seed=5, vocab_size=528, hidden=64, intermediate=192)
    extend_tokenizer(other_dir, 16)
    with pytest.raises(IncompatibleModelsError, match="mlp"):
        merge(tmp_path, {"method": "task_arithmetic", "base": str(base_dir), "models": [
            {"model": str(other_dir)}, {"model": str(task_dir)}]}, "ext_bad")


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from workbench.merge import engine
    slow = float(sys.argv[3])
    compute = engine._Executor.compute
    def throttled(self, op, inputs, **kwargs):
        time.sleep(slow)
        return compute(self, op, inputs, **kwargs)
    engine._Executor.compute = throttled
    recipe, base_dir = engine.load_recipe(sys.argv[1])
    engine.run_merge(recipe, engine.resolve_paths(recipe, base_dir), sys.argv[2], max_shard_bytes=60_000,
                     progress=False)
""")


def test_killed_merge_resumes_to_identical_output(tmp_path, tiny_family):
    (b_dir, _), (l_dir, _), (t_dir, _) = tiny_family["base"], tiny_family["language"], tiny_family["task"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties_sv", "base": str(b_dir), "models": [
        {"model": str(l_dir), "density": 0.3}, {"model": str(t_dir), "density": 0.3, "slack": 0.1}]}))
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, str(script), str(recipe), str(reference), "0"], check=True)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(recipe), str(out), "0.15"])
    partial = tmp_path / "out.partial"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until a few shards are finished
        if partial.is_dir() and len(list(partial.glob("model-*.safetensors"))) >= 3:
            break
        assert proc.poll() is None, "the throttled merge finished before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    finished = len(list(partial.glob("model-*.safetensors")))
    subprocess.run([sys.executable, str(script), str(recipe), str(out), "0"], check=True)
    assert finished >= 3 and out.is_dir() and not partial.exists()
    files = sorted(p.name for p in reference.iterdir() if p.name != "README.md")
    assert files == sorted(p.name for p in out.iterdir() if p.name != "README.md")
    for fname in files:
        if fname == "merge_report.json":
            continue  # holds timings
        assert (reference / fname).read_bytes() == (out / fname).read_bytes(), fname
    assert yaml.safe_load((out / "merge_report.json").read_text())["tensors"] == \
        yaml.safe_load((reference / "merge_report.json").read_text())["tensors"]


def test_progress_in_a_log_is_plain_lines(tmp_path, bf16_family, monkeypatch, capsys):
    # stderr is not a terminal here (pytest captures it): no tqdm carriage returns, plain lines instead,
    # throttled (interval 0 here: one per tensor but the last; a short real merge writes none).
    import workbench.merge.engine as engine

    (b_dir, _), (l_dir, _), (t_dir, _) = bf16_family["base"], bf16_family["lang"], bf16_family["task"]
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(b_dir),
                                           "models": [{"model": str(l_dir)}, {"model": str(t_dir)}]}))
    recipe, base_dir = load_recipe(recipe_file)
    monkeypatch.setattr(engine, "LOG_INTERVAL_S", 0.0)
    result = run_merge(recipe, resolve_paths(recipe, base_dir), tmp_path / "o", progress=True)
    err = capsys.readouterr().err
    lines = err.splitlines()
    n = result.report["output"]["tensors"]
    assert "\r" not in err and len(lines) == n - 1
    assert lines[0].startswith("merge task_arithmetic: ") and lines[-1].endswith(f"({n - 1}/{n} tensors)")
    monkeypatch.setattr(engine, "LOG_INTERVAL_S", 3600.0)
    run_merge(recipe, resolve_paths(recipe, base_dir), tmp_path / "o2", progress=True)
    assert capsys.readouterr().err == ""


def test_errors_name_only_the_options_the_caller_has(tmp_path, tiny_llama_factory):
    """`workbench adapt` has no --allow-nonfinite: a merge it runs must not recommend one."""
    from safetensors.torch import save_file

    base_dir, base = tiny_llama_factory("base", seed=0)
    exp_dir, exp = tiny_llama_factory("exp", seed=1, base_state=base, delta_scale=0.02)
    poisoned = {k: v.clone() for k, v in exp.items()}
    poisoned["model.norm.weight"][0] = float("inf")
    save_file(poisoned, str(exp_dir / "model.safetensors"), metadata={"format": "pt"})
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base_dir),
                                           "models": [{"model": str(exp_dir)}]}))
    recipe, folder = load_recipe(recipe_file)
    with pytest.raises(NonFiniteError) as err:
        run_merge(recipe, resolve_paths(recipe, folder), tmp_path / "out", progress=False, nonfinite_option=None)
    assert str(err.value).endswith("NaN/Inf in the delta of " + str(exp_dir) + " (1) (in the expert or in the base "
                                   + str(base_dir) + "); fix the model")
    assert not (tmp_path / "out.partial").exists()


def test_a_bad_overlap_setting_fails_before_any_output(tmp_path, bf16_family, monkeypatch):
    (b_dir, _), (l_dir, _) = bf16_family["base"], bf16_family["lang"]
    monkeypatch.setenv("WORKBENCH_CUDA_OVERLAP", "yes")
    with pytest.raises(ConfigError) as err:
        merge(tmp_path, {"method": "task_arithmetic", "base": str(b_dir), "models": [{"model": str(l_dir)}]}, "o")
    assert str(err.value) == ("environment variable WORKBENCH_CUDA_OVERLAP='yes': expected 1 (overlap a CUDA "
                              "merge's copies with its compute, the default) or 0 (serial copies)")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_failed_wait_for_an_output_stops_the_merge_and_its_writes(tmp_path, tiny_llama_factory):
    """The writer thread waits for each output's download before writing it (`ready`); where that wait
    fails, the error reaches the engine's thread and the unfinished output is not left as a result."""
    from workbench.checkpoint import ShardedWriter
    from workbench.merge.engine import _WriteBehind

    base_dir, base = tiny_llama_factory("base", seed=0)
    names = sorted(base)
    writer = ShardedWriter(tmp_path / "out", [(n, tuple(base[n].shape), base[n].dtype) for n in names])
    behind = _WriteBehind(writer)
    waited = []
    behind.submit(names[0], base[names[0]], {"op": "copy"}, ready=lambda: waited.append(names[0]))
    behind.wait()
    assert waited == [names[0]] and writer.records()[names[0]] == {"op": "copy"}

    def lost():
        raise RuntimeError("the download of the output failed")

    behind.submit(names[1], base[names[1]], {"op": "copy"}, ready=lost)
    with pytest.raises(RuntimeError, match="the download of the output failed"):
        behind.drain()
    assert names[1] not in writer.records()
    writer.abandon(keep=False)
    assert not (tmp_path / "out").exists()


# method: (recipe keys, each expert's keys)
CUDA_RECIPES = {
    "task_arithmetic": ({"lambda": 0.8}, {}),
    "ties": ({}, {"density": 0.3}),
    "ties_sv": ({}, {"density": 0.3, "slack": 0.1}),
    "dare_ties": ({"seed": 3}, {"density": 0.5}),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("overlap", ["1", "0"])
@pytest.mark.parametrize("method", sorted(CUDA_RECIPES) + ["layer_swap"])
def test_cuda_merges_write_the_cpu_bytes(tmp_path, bf16_family, monkeypatch, method, overlap):
    """Overlapped copies (WORKBENCH_CUDA_OVERLAP=1, the default) and serial ones write the CPU's bytes."""
    (b_dir, _), (l_dir, _), (t_dir, _) = bf16_family["base"], bf16_family["lang"], bf16_family["task"]
    monkeypatch.setenv("WORKBENCH_CUDA_OVERLAP", overlap)
    if method == "layer_swap":
        recipe = {"method": "layer_swap", "base": str(b_dir),
                  "layer_swap": {"language": str(l_dir), "task": str(t_dir), "bottom": 1, "top": 1,
                                 "transition": 1}}
    else:
        top, each = CUDA_RECIPES[method]
        recipe = {"method": method, "base": str(b_dir), **top,
                  "models": [{"model": str(l_dir), **each}, {"model": str(t_dir), **each}]}
    cpu, _ = merge(tmp_path, recipe, "cpu", device="cpu", max_shard_bytes=100_000)
    cuda, _ = merge(tmp_path, recipe, "cuda", device="cuda", max_shard_bytes=100_000)
    shards = sorted(p.name for p in cpu.out_dir.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in cuda.out_dir.glob("*.safetensors"))
    for name in shards:
        assert (cpu.out_dir / name).read_bytes() == (cuda.out_dir / name).read_bytes(), name
