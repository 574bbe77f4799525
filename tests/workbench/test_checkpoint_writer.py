"""ShardedWriter: round trips through transformers, atomic placement, resume after SIGKILL, clear refusals."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from workbench.checkpoint import ModelReader, ShardedWriter, write_state_dict
from workbench.errors import ConfigError, OutputError

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


def _plan(reader):
    return [(n, reader.spec(n).shape, reader.spec(n).dtype) for n in reader.names]


def _copy_model(src, out, **kwargs):
    """Stream every tensor of `src` through a ShardedWriter to `out`; return the writer."""
    reader = ModelReader(src)
    writer = ShardedWriter(out, _plan(reader), source_dir=src, **kwargs)
    for name in writer.pending():
        writer.write(name, reader.get(name))
        reader.release(name)
    writer.finalize()
    return writer


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_sharded_round_trip_loads_bit_identical_in_transformers(tiny_llama_factory, tmp_path, tie):
    src, state = tiny_llama_factory("src", max_shard_size="200KB", tie=tie)
    out = tmp_path / "out"
    writer = _copy_model(src, out, max_shard_bytes=150_000)
    n = len(writer.shards)
    assert n > 3
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = set(state) - ({"lm_head.weight"} if tie else set())
    assert set(index["weight_map"]) == stored and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(state[k].numel() * 4 for k in stored)
    assert {"config.json", "generation_config.json"} | TOKENIZER_FILES <= set(os.listdir(out))
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert not (tmp_path / "out.partial").exists() and not (out / ".manifest.json").exists()
    # The official parser agrees with our headers, and transformers loads the very same bits.
    for shard in shards:
        for name, tensor in load_file(out / shard).items():
            assert torch.equal(tensor, state[name])
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_one_shard_is_model_safetensors_without_index(tiny_llama_factory, tmp_path):
    src, state = tiny_llama_factory("src")
    out = tmp_path / "out"
    _copy_model(src, out)
    assert not (out / "model.safetensors.index.json").exists()
    reader = ModelReader(out)
    assert [f.name for f in reader.files] == ["model.safetensors"]
    assert all(torch.equal(reader.get(n), state[n]) for n in state)


def test_greedy_shard_assignment_in_plan_order(tmp_path):
    plan = [("a", (100,), torch.float32), ("b", (100,), torch.float32), ("c", (300,), torch.float32),
            ("d", (10,), torch.float32)]
    writer = ShardedWriter(tmp_path / "out", plan, max_shard_bytes=1000)
    # 400 + 400 fits, 800 + 1200 does not; a tensor bigger than the limit gets a shard of its own.
    assert [s.names for s in writer.shards] == [["a", "b"], ["c"], ["d"]]


def test_mixed_dtypes_are_aligned_and_readable(tmp_path):
    tensors = {"half_odd": torch.randn(3, 5).half(), "f32": torch.randn(7), "bf16": torch.randn(5).bfloat16(),
               "i64": torch.arange(3), "flags": torch.tensor([True, False, True]), "empty": torch.empty(0, 4),
               "scalar": torch.tensor(2.5)}
    out = write_state_dict(tmp_path / "m", tensors, metadata={"merge": "ties"})
    reader = ModelReader(out)
    official = load_file(out / "model.safetensors")
    for name, tensor in tensors.items():
        assert reader.spec(name).offset % tensor.element_size() == 0
        assert torch.equal(reader.get(name), tensor) and torch.equal(official[name], tensor)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "merge": "ties"}


def test_write_checks_order_shape_and_dtype(tmp_path):
    plan = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]
    writer = ShardedWriter(tmp_path / "out", plan)
    with pytest.raises(ValueError, match=r"write\('b'\): out of order; expected 'a' next"):
        writer.write("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"write\('zzz'\): not in the plan"):
        writer.write("zzz", torch.zeros(1))
    with pytest.raises(ValueError, match=r"got shape \[3, 2\] torch.float32, the plan says shape \[2, 3\]"):
        writer.write("a", torch.zeros(3, 2))
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"torch.float32, the plan says shape \[4\] torch.bfloat16"):
        writer.write("b", torch.zeros(4))
    with pytest.raises(ValueError, match="not written yet, the next is 'b'"):
        writer.finalize()
    assert not (tmp_path / "out").exists()
    writer.write("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="every tensor of the plan has been written"):
        writer.write("b", torch.zeros(4, dtype=torch.bfloat16))
    assert writer.finalize() == tmp_path / "out"


def test_bad_plans_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'a' appears twice"):
        ShardedWriter(tmp_path / "o", [("a", (1,), torch.float32), ("a", (1,), torch.float32)])
    with pytest.raises(ValueError, match="cannot be stored in safetensors"):
        ShardedWriter(tmp_path / "o", [("a", (1,), torch.complex128)])
    with pytest.raises(ValueError, match="extra file 'model.safetensors'"):
        ShardedWriter(tmp_path / "o", [("a", (1,), torch.float32)], extra_files={"model.safetensors": "x"})
    with pytest.raises(ValueError, match="plain file name"):
        ShardedWriter(tmp_path / "o", [("a", (1,), torch.float32)], extra_files={"../x": "x"})


def test_existing_out_dir_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    tensors = {"w": torch.arange(6.0)}
    write_state_dict(out, tensors)
    with pytest.raises(ConfigError, match="already exists"):
        write_state_dict(out, {"w": torch.zeros(6)})
    assert torch.equal(ModelReader(out).get("w"), tensors["w"])
    # Appearing between start and finalize is refused too; the finished shards stay for a retry.
    writer = ShardedWriter(tmp_path / "late", [("w", (6,), torch.float32)])
    writer.write("w", torch.ones(6))
    (tmp_path / "late").mkdir()
    with pytest.raises(ConfigError, match="overwrite=True"):
        writer.finalize()
    assert (tmp_path / "late.partial" / "model.safetensors").is_file()
    # With overwrite the old directory is replaced whole, and nothing is left beside it.
    (out / "stale.txt").write_text("old")
    write_state_dict(out, {"w": torch.zeros(6)}, overwrite=True)
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert torch.equal(ModelReader(out).get("w"), torch.zeros(6))
    assert sorted(os.listdir(tmp_path)) == ["late", "late.partial", "out"]


def test_extra_files_and_config_override(tiny_llama_factory, tmp_path):
    src, state = tiny_llama_factory("src")
    config = json.loads((src / "config.json").read_text())
    config["merge_method"] = "ties_sv"
    out = write_state_dict(tmp_path / "out", state, source_dir=src, extra_files={
        "README.md": "# merged\n", "merge_report.json": b"{}", "config.json": json.dumps(config)})
    assert (out / "README.md").read_text() == "# merged\n" and (out / "merge_report.json").read_bytes() == b"{}"
    assert json.loads((out / "config.json").read_text())["merge_method"] == "ties_sv"
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_interrupted_shard_is_rewritten_and_other_plans_start_fresh(tiny_llama_factory, tmp_path):
    src, _ = tiny_llama_factory("src")
    reader = ModelReader(src)
    plan = _plan(reader)
    out = tmp_path / "out"
    writer = ShardedWriter(out, plan, max_shard_bytes=100_000, source_dir=src)
    first_two = writer.shards[0].names + writer.shards[1].names
    for name in first_two + writer.shards[2].names[:1]:  # stop inside the third shard
        writer.write(name, reader.get(name))
    writer.close()
    stray = tmp_path / "out.partial" / (writer.shards[2].file + ".tmp")
    assert not stray.exists()  # close() drops the unfinished shard: a rerun rewrites it from its start anyway
    stray.write_bytes(b"what a killed run leaves")

    resumed = ShardedWriter(out, plan, max_shard_bytes=100_000, source_dir=src)
    assert resumed.pending() == [n for n, _, _ in plan if n not in first_two]
    assert not stray.exists()
    resumed.close()  # one writer at a time: the next one below waits for this one to let go
    # A corrupted finished shard is not trusted: it is computed again.
    with open(tmp_path / "out.partial" / writer.shards[1].file, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    again = ShardedWriter(out, plan, max_shard_bytes=100_000, source_dir=src)
    assert again.pending() == [n for n, _, _ in plan if n not in writer.shards[0].names]
    again.close()
    # Another plan (here: another shard size) discards everything.
    other = ShardedWriter(out, plan, max_shard_bytes=50_000, source_dir=src)
    assert other.pending() == [n for n, _, _ in plan]
    assert sorted(os.listdir(tmp_path / "out.partial")) == [".manifest.json", ".workbench-owned"]


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from workbench.checkpoint import ModelReader, ShardedWriter
    src, out = sys.argv[1], sys.argv[2]
    reader = ModelReader(src)
    plan = [(n, reader.spec(n).shape, reader.spec(n).dtype) for n in reader.names]
    writer = ShardedWriter(out, plan, max_shard_bytes=40_000, source_dir=src)
    for name in writer.pending():
        writer.write(name, reader.get(name))
        time.sleep(0.1)
    writer.finalize()
""")


def test_write_killed_part_way_resumes_to_identical_bytes(tiny_llama_factory, tmp_path):
    src, _ = tiny_llama_factory("src", max_shard_size="200KB")
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(src), str(out)])
    try:
        deadline = time.monotonic() + 60
        while _finished_shards(partial) < 3:
            assert not out.exists(), "a partial directory appeared at the final path"
            assert proc.poll() is None, "the writer ended before it could be killed"
            assert time.monotonic() < deadline, "the writer finished no shard in 60 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists() and partial.is_dir()

    reader = ModelReader(src)
    plan = _plan(reader)
    writer = ShardedWriter(out, plan, max_shard_bytes=40_000, source_dir=src)
    pending = writer.pending()
    assert 0 < len(pending) < len(plan) - 3
    assert pending == [n for n, _, _ in plan if n in set(pending)]
    for name in pending:
        writer.write(name, reader.get(name))
    writer.finalize()
    assert not partial.exists()

    _copy_model(src, tmp_path / "reference", max_shard_bytes=40_000)
    resumed, reference = _files(out), _files(tmp_path / "reference")
    assert sorted(resumed) == sorted(reference) and len(resumed) > 10
    for fname, data in reference.items():
        assert resumed[fname] == data, fname


def _finished_shards(partial: Path) -> int:
    try:
        return len(json.loads((partial / ".manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_empty_plan_writes_a_valid_empty_model(tmp_path):
    out = write_state_dict(tmp_path / "empty", {})
    assert os.listdir(out) == ["model.safetensors"]
    assert ModelReader(out).names == [] and load_file(out / "model.safetensors") == {}


def test_records_survive_a_resume_and_resume_key_invalidates(tmp_path):
    import torch

    from workbench.checkpoint import ShardedWriter

    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(6)}
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    out = tmp_path / "out"
    writer = ShardedWriter(out, plan, max_shard_bytes=512, resume_key="recipe-a")
    for name in writer.pending()[:4]:  # two shards of two tensors finished, then "killed"
        writer.write(name, tensors[name], record={"mean": float(tensors[name].mean())})
    writer.close()
    again = ShardedWriter(out, plan, max_shard_bytes=512, resume_key="recipe-a")
    assert again.pending() == ["t4", "t5"]
    assert list(again.records()) == ["t0", "t1", "t2", "t3"] and again.records()["t2"] == {"mean": 2.0}
    for name in again.pending():
        again.write(name, tensors[name], record={"mean": float(tensors[name].mean())})
    assert list(again.records()) == [f"t{i}" for i in range(6)]
    again.close()
    other = ShardedWriter(out, plan, max_shard_bytes=512, resume_key="recipe-b")
    assert other.pending() == list(tensors) and other.records() == {}
    other.close()


@pytest.mark.parametrize("dtypes", [("bf16",), ("bf16", "fp32"), ("fp32", "bf16", "empty")],
                         ids=["file-order", "mixed-item-sizes", "with-empty"])
def test_manifest_sha256_is_the_finished_shard_files_sha256(tmp_path, dtypes):
    # The writer hashes bytes as it writes them in file order and reads back only what came out of that
    # order (mixed item sizes are laid out by decreasing size): either way the digest is the file's.
    import hashlib

    kinds = {"bf16": ((33, 7), torch.bfloat16), "fp32": ((5, 3), torch.float32), "empty": ((0, 4), torch.float32)}
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for i in range(7):
        shape, dtype = kinds[dtypes[i % len(dtypes)]]
        tensors[f"t{i}"] = torch.randn(shape, generator=gen).to(dtype)
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path / "out", plan, max_shard_bytes=600)
    assert len(writer.shards) > 1
    for name in writer.pending():
        writer.write(name, tensors[name])
    writer.close()
    partial = tmp_path / "out.partial"
    shards = json.loads((partial / ".manifest.json").read_text())["shards"]
    assert len(shards) == len(writer.shards)
    for fname, entry in shards.items():
        assert entry["sha256"] == hashlib.sha256((partial / fname).read_bytes()).hexdigest(), fname


def test_a_tensor_written_in_parts_reports_each_and_writes_the_same_bytes(tmp_path):
    # write(..., written=) writes a big tensor in parts of PART_BYTES and reports each part once it is
    # written and hashed (the merge engine drops an input map's pages behind it): same file, same sha256.
    import hashlib

    from workbench.checkpoint.writer import PART_BYTES

    gen = torch.Generator().manual_seed(3)
    tensors = {"small": torch.randn(5, 7, generator=gen),
               "big": torch.randn(PART_BYTES + 1001, generator=gen).to(torch.bfloat16),  # 2 parts + 2002 bytes
               "tail": torch.randn(3, generator=gen)}
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    digests, parts = {}, []
    for how in ("whole", "parts"):
        writer = ShardedWriter(tmp_path / how, plan)
        for name in writer.pending():
            seen = (lambda a, b, name=name: parts.append((name, a, b))) if how == "parts" else None
            writer.write(name, tensors[name], written=seen)
        writer.close()  # the finished shard stays in the partial folder, with its manifest
        partial = tmp_path / f"{how}.partial"
        digests[how] = hashlib.sha256((partial / "model.safetensors").read_bytes()).hexdigest()
        manifest = json.loads((partial / ".manifest.json").read_text())
        assert manifest["shards"]["model.safetensors"]["sha256"] == digests[how]
        assert torch.equal(load_file(partial / "model.safetensors")["big"], tensors["big"])
    assert digests["whole"] == digests["parts"]
    big = tensors["big"].numel() * 2
    by_name = {}
    for name, a, b in parts:
        by_name.setdefault(name, []).append((a, b))
    assert by_name["big"][0][0] == 0 and by_name["big"][-1][1] == big and len(by_name["big"]) == 3
    assert all(b - a <= PART_BYTES for a, b in by_name["big"])
    assert all(x[1] == y[0] for x, y in zip(by_name["big"], by_name["big"][1:]))   # consecutive, no gap
    assert by_name["small"] == [(0, 5 * 7 * 4)]


def test_one_writer_per_output_and_the_lock_goes_with_it(tmp_path):
    plan = [("w", (6,), torch.float32)]
    first = ShardedWriter(tmp_path / "out", plan)
    with pytest.raises(OutputError, match=rf"output {tmp_path / 'out'} is in use by PID {os.getpid()}"):
        ShardedWriter(tmp_path / "out", plan)
    first.write("w", torch.ones(6))
    first.finalize()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    write_state_dict(tmp_path / "out", {"w": torch.zeros(6)}, overwrite=True)  # free again


def test_a_partial_of_an_earlier_version_still_resumes(tmp_path):
    """A `.partial` written before the marker existed holds the writer's manifest: that is proof enough."""
    plan = [("a", (4,), torch.float32), ("b", (4,), torch.float32)]
    writer = ShardedWriter(tmp_path / "out", plan, max_shard_bytes=16)
    writer.write("a", torch.ones(4))
    writer.close()
    (tmp_path / "out.partial" / ".workbench-owned").unlink()
    resumed = ShardedWriter(tmp_path / "out", plan, max_shard_bytes=16)
    assert resumed.pending() == ["b"]
    resumed.write("b", torch.zeros(4))
    out = resumed.finalize()
    assert sorted(os.listdir(out)) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                       "model.safetensors.index.json"]


def test_a_file_named_like_the_temporary_folder_is_left_alone(tmp_path):
    (tmp_path / "out.partial").write_text("my notes")
    with pytest.raises(ConfigError, match=r"out\.partial exists and was not made by workbench"):
        write_state_dict(tmp_path / "out", {"w": torch.zeros(2)})
    assert (tmp_path / "out.partial").read_text() == "my notes"
    assert sorted(os.listdir(tmp_path)) == ["out.partial"]
