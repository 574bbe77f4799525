"""ModelReader over real tiny Llama directories: bitwise reads, copy-on-write buffers, release, pickles."""
import json
import os
import shutil

import pytest
import torch

from workbench.checkpoint import ModelReader, find_weight_files, write_state_dict
from workbench.errors import CheckpointError, UnsafeCheckpointError


@pytest.mark.parametrize("shard", [None, "200KB"], ids=["single", "sharded"])
def test_reads_every_tensor_bitwise(tiny_llama_factory, shard):
    path, state = tiny_llama_factory("m", max_shard_size=shard)
    with ModelReader(path) as reader:
        assert sorted(reader.names) == sorted(state)
        assert len(reader.files) == (1 if shard is None else len(set(json.loads(
            (path / "model.safetensors.index.json").read_text())["weight_map"].values())))
        assert reader.config["num_hidden_layers"] == 4 and not reader.is_tied
        for name in reader.names:
            spec = reader.spec(name)
            tensor = reader.get(name)
            assert spec.shape == tuple(state[name].shape) and spec.dtype == state[name].dtype
            assert spec.nbytes == tensor.numel() * tensor.element_size()
            assert torch.equal(tensor, state[name])
            assert spec.offset % spec.dtype.itemsize == 0  # a view of the map, not a copy


def test_file_order_follows_offsets(tiny_llama_factory):
    path, _ = tiny_llama_factory("m")
    reader = ModelReader(path)
    offsets = [reader.spec(n).offset for n in reader.names]
    assert offsets == sorted(offsets)


def test_tied_model_stores_no_lm_head(tiny_llama_factory):
    path, state = tiny_llama_factory("tied", tie=True, dtype=torch.bfloat16)
    reader = ModelReader(path)
    assert reader.is_tied
    assert "lm_head.weight" not in reader and "model.embed_tokens.weight" in reader
    assert sorted(reader.names) == sorted(set(state) - {"lm_head.weight"})
    for name in reader.names:
        assert reader.get(name).dtype == torch.bfloat16 and torch.equal(reader.get(name), state[name])


def test_get_is_writable_and_never_changes_the_file(tiny_llama_factory):
    path, state = tiny_llama_factory("m")
    name = "model.layers.1.mlp.down_proj.weight"
    reader = ModelReader(path)
    before = reader.file_hashes()
    tensor = reader.get(name)
    tensor.mul_(2).add_(1)  # a merge writing its output over the base's buffer
    assert torch.equal(tensor, state[name] * 2 + 1)
    assert torch.equal(reader.get(name), tensor)  # same reader: the same private buffer
    assert reader.file_hashes() == before
    assert torch.equal(ModelReader(path).get(name), state[name])


def test_release_drops_pages_and_keeps_the_rest_readable(tmp_path):
    # 64 MiB: big enough that the drop shows clearly in RSS over the interpreter's own noise.
    big = torch.arange(16 * 1024 * 1024, dtype=torch.float32)
    small = torch.randn(1000)
    write_state_dict(tmp_path / "m", {"small": small, "big": big, "after": small * 2})
    reader = ModelReader(tmp_path / "m")
    rss0 = _rss()
    tensor = reader.get("big")
    assert tensor.sum().item() == big.sum().item()  # touches every page
    rss1 = _rss()
    reader.release("big")
    del tensor
    rss2 = _rss()
    assert rss1 - rss0 > 48 * 2**20, (rss0, rss1)
    assert rss1 - rss2 > 48 * 2**20, (rss1, rss2)
    # Its neighbours are intact, and the released tensor reads afresh from the file.
    assert torch.equal(reader.get("small"), small) and torch.equal(reader.get("after"), small * 2)
    assert torch.equal(reader.get("big"), big)


def test_release_of_a_part_drops_only_the_pages_inside_it(tmp_path):
    # Write over the whole map, release bytes [start, end) of it: exactly the whole pages inside that
    # range read the file again; every other byte keeps what was written.
    n = 5 * 4096 + 123                      # float32 elements: about 20 pages, not a whole number of them
    write_state_dict(tmp_path / "m", {"head": torch.zeros(77), "t": torch.arange(n, dtype=torch.float32)})
    reader = ModelReader(tmp_path / "m")
    t = reader.get("t")
    t.fill_(-1.0)
    offset, page = reader.spec("t").offset, os.sysconf("SC_PAGE_SIZE")
    start, end = 2 * 4096 + 10, 11 * 4096 + 5    # bytes within the tensor, neither on a page boundary
    reader.release("t", start, end)
    first = -(-(offset + start) // page) * page - offset  # the released bytes: whole pages inside the range
    last = (offset + end) // page * page - offset
    assert 0 < last - first < end - start
    fresh = torch.arange(n, dtype=torch.float32)
    got = reader.get("t")
    released = torch.zeros(n, dtype=torch.bool)
    released[first // 4:last // 4] = True
    assert torch.equal(got[released], fresh[released])
    assert (got[~released] == -1.0).all()
    assert torch.equal(reader.get("head"), torch.zeros(77))


def test_release_keeps_a_neighbours_writes_on_a_shared_page(tmp_path):
    # Two odd-sized tensors share a page; writing over one and releasing the other must not undo the write.
    a, b = torch.randn(1500), torch.randn(1500)
    write_state_dict(tmp_path / "m", {"a": a, "b": b})
    reader = ModelReader(tmp_path / "m")
    tb = reader.get("b")
    tb.fill_(3.0)
    reader.get("a").sum()
    reader.release("a")
    assert torch.equal(reader.get("b"), torch.full((1500,), 3.0))


def test_read_into_a_preallocated_buffer(tiny_llama_factory):
    path, state = tiny_llama_factory("m", max_shard_size="200KB")
    reader = ModelReader(path)
    for name in reader.names:
        out = torch.empty(reader.spec(name).shape, dtype=reader.spec(name).dtype)
        assert reader.read_into(name, out) is out and torch.equal(out, state[name])
    with pytest.raises(ValueError, match="expected torch.float32"):
        reader.read_into("model.norm.weight", torch.empty(64, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        reader.read_into("model.layers.0.self_attn.q_proj.weight", torch.empty(64, 64).t())


def test_file_hashes_are_sha256_of_each_shard(tiny_llama_factory):
    import hashlib

    path, _ = tiny_llama_factory("m", max_shard_size="200KB")
    hashes = ModelReader(path).file_hashes()
    assert set(hashes) == {p.name for p in path.glob("*.safetensors")}
    for fname, digest in hashes.items():
        assert digest == hashlib.sha256((path / fname).read_bytes()).hexdigest()


def test_unknown_tensor_and_closed_reader(tiny_llama_factory):
    path, _ = tiny_llama_factory("m")
    reader = ModelReader(path)
    kept = reader.get("model.norm.weight")
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        reader.get("nope")
    reader.close()
    assert torch.isfinite(kept).all()  # tensors outlive the reader
    with pytest.raises(ValueError, match="closed"):
        reader.get("model.norm.weight")


# ----- pickles and other formats


def _pickle_dir(tmp_path, state, name="pickled"):
    d = tmp_path / name
    d.mkdir()
    torch.save(state, d / "pytorch_model.bin")
    return d


def test_pickle_only_directory_is_refused(tiny_llama_factory, tmp_path):
    path, state = tiny_llama_factory("m")
    d = _pickle_dir(tmp_path, state)
    shutil.copy(path / "config.json", d / "config.json")
    assert find_weight_files(d).format == "pickle"
    with pytest.raises(UnsafeCheckpointError) as err:
        ModelReader(d)
    msg = str(err.value)
    for part in ("pytorch_model.bin", "arbitrary code", "weights_only=True", "safe_serialization=True"):
        assert part in msg
    # It names only what exists: no command takes a pickle opt-in.
    assert "--allow-pickle" not in msg and "allow_pickle" not in msg


@pytest.mark.parametrize("fname", ["pytorch_model.bin", "weights.pt", "consolidated.pth"])
def test_allow_pickle_reads_with_weights_only(tiny_llama_factory, tmp_path, fname):
    _, state = tiny_llama_factory("m")
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save(state, d / fname)
    (d / "training_args.bin").write_bytes(b"not weights")  # ignored: not a weight file
    reader = ModelReader(d, allow_pickle=True)
    assert reader.format == "pickle" and sorted(reader.names) == sorted(state)
    for name in reader.names:
        assert torch.equal(reader.get(name), state[name])
        out = torch.empty_like(state[name])
        assert torch.equal(reader.read_into(name, out), state[name])
    assert set(reader.file_hashes()) == {fname}


def test_allow_pickle_reads_sharded_bin_with_index(tiny_llama_factory, tmp_path):
    _, state = tiny_llama_factory("m")
    d = tmp_path / "pickled"
    d.mkdir()
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:20], "pytorch_model-00002-of-00002.bin": names[20:]}
    for fname, part in halves.items():
        torch.save({n: state[n] for n in part}, d / fname)
    weight_map = {n: f for f, part in halves.items() for n in part}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UnsafeCheckpointError):
        ModelReader(d)
    reader = ModelReader(d, allow_pickle=True)
    assert [f.name for f in reader.files] == sorted(halves)
    assert all(torch.equal(reader.get(n), state[n]) for n in names)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_allow_pickle_still_refuses_code(tmp_path, monkeypatch):
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"w": _RunsCode()}, d / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin: refused by torch.load"):
        ModelReader(d, allow_pickle=True)
    assert not (tmp_path / "PWNED").exists()


def test_gguf_only_directory_says_to_fetch(tmp_path):
    d = tmp_path / "gguf"
    d.mkdir()
    (d / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(CheckpointError, match="workbench fetch"):
        ModelReader(d)


def test_adapter_only_directory_says_to_merge_it(tmp_path):
    write_state_dict(tmp_path / "adapter", {"base_model.model.lora_A.weight": torch.zeros(2, 2)})
    (tmp_path / "adapter" / "model.safetensors").rename(tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="PEFT adapter"):
        ModelReader(tmp_path / "adapter")


def test_missing_directory_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ModelReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model weights"):
        ModelReader(tmp_path / "empty")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
