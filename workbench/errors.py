"""One exception type per kind of user error; the CLI turns each into one line and an exit code.

Messages name the file, key, tensor or value at fault and say what was expected.
"""


class WorkbenchError(Exception):
    """Base class: an error the user can act on. Exit code 1 (a runtime failure)."""

    exit_code = 1


class ConfigError(WorkbenchError):
    """A language config, recipe or command-line value is wrong. Exit code 2 (bad usage or config)."""

    exit_code = 2


class IncompatibleModelsError(WorkbenchError):
    """Models that must share names, shapes, dtypes or architecture do not."""


class UnsafeCheckpointError(WorkbenchError):
    """A pickled checkpoint was found and the user did not allow pickles."""


class CheckpointError(WorkbenchError):
    """A checkpoint file or directory is missing, truncated or corrupt."""


class InvalidModelError(CheckpointError):
    """A model's files contradict themselves: config.json against the tensors' shapes, a dtype label against
    the other tensors, token ids or layer indices past the model's own sizes, an embedding grown without the
    tokenizer that proves it. It cannot be right whatever the run: exit code 2, like a bad config."""

    exit_code = 2


class OutputError(WorkbenchError):
    """An output cannot be written: the disk is full, the folder is read-only, or another process is
    writing the same output. The message names the path."""


class NonFiniteError(WorkbenchError):
    """An input tensor holds NaN or Inf."""


class DataError(WorkbenchError):
    """A data source is missing, malformed or empty after filtering."""


class MissingDependencyError(WorkbenchError):
    """An optional package the requested step needs is not installed."""


class HubUnavailableError(WorkbenchError):
    """The Hugging Face Hub cannot be reached for a model or data set the run needs."""


class UnsupportedModelError(WorkbenchError):
    """A model's architecture, tokenizer or settings are ones the requested step cannot handle (e.g. GGUF
    export of a non-Llama model). Exit code 2: the input is valid, but not for this command."""

    exit_code = 2


def format_path(path):
    """A dotted key path such as `profiles.paper.merge.density` from a sequence of keys and indices."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
