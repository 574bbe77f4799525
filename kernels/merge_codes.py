"""The names the merge kernels share across languages: what a merge computes and the columns it counts.

Both are mirrored in cpu_native.c (`enum wb_method`, `enum wb_count`), whose `wb_abi` the loader checks
against these, and read by the Triton kernel as constants.
"""
from enum import IntEnum


class Method(IntEnum):
    """What `ties.ties_merge` computes."""

    TIES = 0
    TASK_ARITHMETIC = 1
    LINEAR = 2


class Count(IntEnum):
    """The per-expert count columns of a merge."""

    KEPT = 0                        # |keep_t| (finite elements in the top-k)
    KEPT_ENTERED = 1                # |keep_t ∧ agree_t|
    PROTECTED = 2                   # |protect_t|
    PROTECTED_ENTERED = 3           # |protect_t ∧ agree_t|
    KEPT_ENTERED_PLAIN = 4          # |keep_t ∧ agree_t| under the plain TIES election S_plain
    PROTECTED_ENTERED_PLAIN = 5     # |protect_t ∧ agree_t| under S_plain
    NONFINITE = 6                   # elements where δ_t (θ_t for linear) is not finite
