"""Fixtures for the kernel tests: backends, dtypes with tolerances, awkward sizes, seeded inputs.

Triton runs under its interpreter on CPU tensors when no GPU is present. The interpreter must be chosen
before `triton` is first imported, so it is imported here, at collection time, in interpreter mode
(`load_triton` does that without leaving TRITON_INTERPRET set, so tests of other packages that run in the
same process keep their normal dispatch). With a GPU, the Triton tests run compiled, on CUDA tensors.
"""
import os
import zlib

import pytest
import torch

from workbench.kernels.dispatch import KernelBackendError, load_triton, triton_available
from workbench.kernels import cpu_native

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_IMPORT_ERROR = None
if triton_available():
    try:
        load_triton(TRITON_DEVICE)
    except KernelBackendError as exc:   # reported by the Triton tests, not at collection
        TRITON_IMPORT_ERROR = str(exc)

# Sizes every backend runs: a single element, less than a block, a block-and-a-bit (tail masking), and
# a non-contiguous 2-D view (a transposed, column-sliced matrix). The large size (1000003) runs on the
# fast CPU path only: the interpreter would take minutes.
SIZES = [1, 7, 4099, "2d-view"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BASE_SEED = int(os.environ.get("WORKBENCH_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_generate_tests(metafunc):
    """A test that takes `size` runs on every size of SIZES; one that takes `dtype`, on every dtype."""
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", SIZES, ids=[str(s) for s in SIZES])
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded per test (printed, so a failure shows how to replay it)."""
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    print(f"seed={seed} (replay the run: WORKBENCH_TEST_SEED={BASE_SEED})")
    return torch.Generator().manual_seed(seed)


def _cpu_kernels(monkeypatch, which: str):
    """The CPU path's C kernels ("c": skipped where they cannot be built) or its PyTorch pieces ("torch")."""
    monkeypatch.setenv("WORKBENCH_NATIVE", "1" if which == "c" else "0")
    if which == "c" and cpu_native.library() is None:
        pytest.skip(cpu_native.why())


@pytest.fixture(params=["cpu", "cpu-torch", "triton"])
def backend(request, monkeypatch) -> str:
    """Run the public API on one backend; returns the device its inputs must live on.

    "cpu" is the CPU path with its C kernels, "cpu-torch" the same path with its chunked PyTorch pieces.
    """
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("WORKBENCH_KERNELS", "cpu" if request.param.startswith("cpu") else request.param)
    if request.param.startswith("cpu"):
        _cpu_kernels(monkeypatch, "torch" if request.param == "cpu-torch" else "c")
    if request.param == "triton":
        if not triton_available():
            pytest.skip("triton is not installed")
        if TRITON_IMPORT_ERROR:
            pytest.fail(TRITON_IMPORT_ERROR)
        return TRITON_DEVICE
    return "cpu"


@pytest.fixture(params=["c", "torch"])
def cpu_backend(request, monkeypatch):
    """Run the public API on the fast CPU path: its C kernels, then its chunked PyTorch pieces."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("WORKBENCH_KERNELS", "cpu")
    _cpu_kernels(monkeypatch, request.param)


class Inputs:
    """Random test tensors from one generator."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def tensor(self, size, dtype, scale=1.0) -> torch.Tensor:
        """`size` elements (1-D), or the non-contiguous 2-D view for "2d-view", in `dtype`."""
        if size == "2d-view":
            full = torch.randn(67, 2 * 131, generator=self.gen) * scale
            return full.to(dtype)[:, ::2].t()          # shape (131, 67), strides (2, 262)
        return (torch.randn(size, generator=self.gen) * scale).to(dtype)

    def expert(self, base: torch.Tensor, scale=0.02) -> torch.Tensor:
        """base + N(0, scale²) in base's dtype, with base's strides (a view's expert is a view too)."""
        noisy = (base.float() + torch.randn(base.shape, generator=self.gen) * scale).to(base.dtype)
        if base.is_contiguous():
            return noisy
        return torch.empty_strided(base.shape, base.stride(), dtype=base.dtype).copy_(noisy)


@pytest.fixture
def make(gen) -> Inputs:
    return Inputs(gen)
