"""Checkpoint I/O: lazy reader, streaming sharded writer, compatibility check (docs/design.md §6).

Only safetensors are read by default; pickles need an explicit allow_pickle and then load with
`torch.load(weights_only=True)`. Nothing here ever sets trust_remote_code.
"""
from workbench.checkpoint.compat import CompatReport, check_compatible
from workbench.checkpoint.reader import ModelReader
from workbench.checkpoint.safetensors_format import TensorSpec, read_header
from workbench.checkpoint.weight_files import WeightFiles, find_weight_files, load_pickle_checkpoint
from workbench.checkpoint.writer import ShardedWriter, write_state_dict

__all__ = [
    "CompatReport", "ModelReader", "ShardedWriter", "TensorSpec", "WeightFiles", "check_compatible",
    "find_weight_files", "load_pickle_checkpoint", "read_header", "write_state_dict",
]
