"""Truncated, corrupt or hostile model files fail at open time with an error naming the file, before they cost
time, memory or an output."""
import json
import os
import shutil
import struct
import subprocess
import sys

import psutil
import pytest
import torch

from workbench.analysis import analyze_models
from workbench.checkpoint import ModelReader, check_compatible, read_header
from workbench.checkpoint.consistency import check_consistent
from workbench.errors import CheckpointError, InvalidModelError

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


# ----- hostile files: each is refused by name before it costs time or memory (issue 20)

def test_nested_json_in_a_header_is_a_corrupt_header(sharded):
    raw = (sharded / SHARD).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].rstrip()
    nested = header[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    nested += b" " * (-len(nested) % 8)
    (sharded / SHARD).write_bytes(struct.pack("<Q", len(nested)) + nested + raw[8 + n:])
    _open_fails(sharded, SHARD, "nested too deeply")


def test_nested_json_in_config_names_the_file(sharded):
    (sharded / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    _open_fails(sharded, "config.json", "nested too deeply")


@pytest.mark.parametrize("dtype", [["BF16"], {"F32": 1}])
def test_a_dtype_that_is_not_a_code(sharded, dtype):
    _rewrite_header(sharded / SHARD, lambda h: h[_first_tensor(h)].update(dtype=dtype))
    _open_fails(sharded, SHARD, f"unknown or unsupported dtype {dtype!r}")


SPECIAL_OPEN = """
import sys
from workbench.checkpoint import ModelReader, check_compatible
from workbench.errors import WorkbenchError
try:
    with ModelReader(sys.argv[1]) as a, ModelReader(sys.argv[2]) as b:
        check_compatible({"base": a, "fifo": b})
except WorkbenchError as e:
    print(e)
    sys.exit(3)
"""


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_fifo_in_place_of_a_model_file_is_refused_unopened(tiny_llama_factory, tmp_path, name):
    base, _ = tiny_llama_factory("base")
    other, _ = tiny_llama_factory("other", seed=1)
    (other / name).unlink()
    os.mkfifo(other / name)
    # Reading a FIFO without a writer blocks forever: a subprocess with a deadline stands for the user.
    out = subprocess.run([sys.executable, "-c", SPECIAL_OPEN, str(base), str(other)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert f"{other / name}: is a FIFO (named pipe), not a regular file" in out.stdout


def test_a_device_in_place_of_the_tokenizer_is_refused(tiny_llama_factory):
    base, _ = tiny_llama_factory("base")
    other, _ = tiny_llama_factory("other", seed=1)
    (other / "tokenizer.json").unlink()
    (other / "tokenizer.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="tokenizer.json: is a character device, not a regular file"):
        ModelReader(other)


def _bf16_pair(tiny_llama_factory):
    base, state = tiny_llama_factory("base", dtype=torch.bfloat16)
    expert, _ = tiny_llama_factory("expert", seed=1, base_state=state, delta_scale=0.02, dtype=torch.bfloat16)
    return base, expert


def test_a_bf16_tensor_relabelled_as_integers_is_refused(tiny_llama_factory):
    base, expert = _bf16_pair(tiny_llama_factory)
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_header(expert / "model.safetensors", lambda h: h[name].update(dtype="I16"))  # same byte size
    with pytest.raises(InvalidModelError) as err:
        check_compatible({"base": ModelReader(base), "expert": ModelReader(expert)})
    assert err.value.exit_code == 2
    assert (f"tensor {name!r} in model.safetensors is labelled I16, but the model's other tensors are floating "
            f"point (bfloat16)") in str(err.value)


@pytest.mark.parametrize("key, value, tensor", [
    ("vocab_size", 9999, "model.embed_tokens.weight"),
    ("hidden_size", 96, "model.embed_tokens.weight"),
    ("intermediate_size", 320, "model.layers.0.mlp.gate_proj.weight"),
    ("num_attention_heads", 8, "model.layers.0.self_attn.q_proj.weight"),
    ("num_key_value_heads", 4, "model.layers.0.self_attn.k_proj.weight"),
])
def test_a_config_that_disagrees_with_the_tensors_is_refused(tiny_llama_factory, key, value, tensor):
    base, state = tiny_llama_factory("base")
    expert, _ = tiny_llama_factory("expert", seed=1, base_state=state, delta_scale=0.02)
    config = json.loads((expert / "config.json").read_text())
    config[key] = value
    (expert / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidModelError) as err:
        check_compatible({"base": ModelReader(base), "expert": ModelReader(expert)})
    assert f"config.json {key} = {value}" in str(err.value) and repr(tensor) in str(err.value)


@pytest.mark.parametrize("layers", [3, 5])
def test_num_hidden_layers_must_count_the_stored_layers(tiny_llama_factory, layers):
    path, _ = tiny_llama_factory("m")
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidModelError, match=f"num_hidden_layers = {layers}"):
        check_consistent(ModelReader(path))


def test_a_huge_layer_index_is_refused_before_any_table_is_sized(tiny_llama_factory, tmp_path):
    path, _ = tiny_llama_factory("m")
    renamed = "model.layers.10000000.mlp.up_proj.weight"
    _rewrite_header(path / "model.safetensors",
                    lambda h: h.update({renamed: h.pop("model.layers.3.mlp.up_proj.weight")}))
    with pytest.raises(InvalidModelError, match=r"tensor 'model\.layers\.10000000\.mlp\.up_proj\.weight' has layer "
                                                r"index 10000000, but config\.json num_hidden_layers = 4"):
        analyze_models(path, {"expert": path})
    assert not (tmp_path / "an").exists()


@pytest.mark.parametrize("token_id", [2 * 10**8, 10**12, -3])
def test_a_token_id_past_the_vocabulary_is_refused_before_it_allocates(tiny_llama_factory, token_id):
    base, state = tiny_llama_factory("base")
    expert, _ = tiny_llama_factory("expert", seed=1, base_state=state, delta_scale=0.02)
    (expert / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": token_id}}}))
    process = psutil.Process()
    before = process.memory_info().rss
    with pytest.raises(InvalidModelError) as err:
        check_compatible({"base": ModelReader(base), "expert": ModelReader(expert)})
    assert f"the tokenizer gives token 'a' the id {token_id}, outside the model's 512 vocabulary rows" in str(err.value)
    assert process.memory_info().rss - before < 200 * 1024**2  # the dense list of 2e8 ids took 1.75 GB
