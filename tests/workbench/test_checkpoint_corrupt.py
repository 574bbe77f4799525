"""Truncated or corrupt safetensors files fail at open time with a CheckpointError naming the file."""
import json
import shutil
import struct

import pytest

from workbench.checkpoint import ModelReader, read_header
from workbench.errors import CheckpointError

SHARD = "model-00003-of-00006.safetensors"


@pytest.fixture
def sharded(tiny_llama_factory):
    path, _ = tiny_llama_factory("m", max_shard_size="200KB")
    assert (path / SHARD).is_file()
    return path


def _rewrite_header(file, edit):
    """Apply `edit(header_dict)` and write the file back with the same data buffer."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _open_fails(path, *needles):
    with pytest.raises(CheckpointError) as err:
        ModelReader(path)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    return str(err.value)


def test_truncated_shard_names_file_and_tensor(sharded):
    file = sharded / SHARD
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    specs, _ = read_header(sharded / "model-00002-of-00006.safetensors")  # the others still parse
    assert specs
    msg = _open_fails(sharded, SHARD, "tensor '", "outside the file")
    assert "truncated" in msg


@pytest.mark.parametrize("keep", [0, 5, 8, 100])
def test_truncated_within_the_header(sharded, keep):
    file = sharded / SHARD
    file.write_bytes(file.read_bytes()[:keep])
    _open_fails(sharded, SHARD, "truncated")


def test_garbage_header(sharded):
    file = sharded / SHARD
    raw = bytearray(file.read_bytes())
    raw[8:64] = bytes(range(200, 256))
    file.write_bytes(bytes(raw))
    _open_fails(sharded, SHARD, "not valid JSON")


def test_header_length_past_the_end(sharded):
    file = sharded / SHARD
    raw = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    _open_fails(sharded, SHARD, "header length")


def test_offsets_that_overflow_the_file(sharded):
    def edit(header):
        name = _first_tensor(header)
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + 2**40, end + 2**40]

    _rewrite_header(sharded / SHARD, edit)
    _open_fails(sharded, SHARD, "outside the file")


def test_offsets_inconsistent_with_shape(sharded):
    def edit(header):
        header[_first_tensor(header)]["shape"][0] += 1

    _rewrite_header(sharded / SHARD, edit)
    _open_fails(sharded, SHARD, "needs")


def test_overlapping_tensors(sharded):
    def edit(header):
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        a, b = header[names[0]], header[names[1]]
        size = a["data_offsets"][1] - a["data_offsets"][0]
        if b["data_offsets"][1] - b["data_offsets"][0] == size:  # point b at a's bytes
            b["data_offsets"] = list(a["data_offsets"])
        else:
            b["shape"], b["data_offsets"] = list(a["shape"]), list(a["data_offsets"])
            b["dtype"] = a["dtype"]

    _rewrite_header(sharded / SHARD, edit)
    _open_fails(sharded, SHARD, "overlaps")


def test_unknown_dtype(sharded):
    _rewrite_header(sharded / SHARD, lambda h: h[_first_tensor(h)].update(dtype="F13"))
    _open_fails(sharded, SHARD, "unknown or unsupported dtype 'F13'")


def test_trailing_bytes(sharded):
    with open(sharded / SHARD, "ab") as f:
        f.write(b"\0" * 16)
    _open_fails(sharded, SHARD, "unexpected bytes")


def test_index_names_a_missing_shard(sharded):
    (sharded / SHARD).unlink()
    _open_fails(sharded, SHARD, "missing")


def test_index_disagrees_with_shards(sharded, tmp_path):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = next(n for n, f in index["weight_map"].items() if f == SHARD)
    index["weight_map"][name] = "model-00001-of-00006.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    _open_fails(sharded, name, SHARD)


def test_a_good_copy_still_opens(sharded, tmp_path):
    shutil.copytree(sharded, tmp_path / "copy")
    assert len(ModelReader(tmp_path / "copy").names) == 39
