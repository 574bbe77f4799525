"""The dispatcher: which backend runs, lazy Triton import, forced backends, and GPU code generation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.kernels.dispatch import KernelBackendError, describe, kernel_backend
from workbench.kernels.ties import ties_merge
from workbench.kernels.dispatch import triton_available


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WORKBENCH_KERNELS")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("WORKBENCH_KERNELS", raising=False)
    return monkeypatch


def test_cpu_tensors_take_the_c_kernels_or_the_pytorch_pieces(clean_env):
    from workbench.kernels import cpu_native

    c = "c" if cpu_native.library() is not None else "torch"
    assert kernel_backend(torch.zeros(3), native=True) == c
    assert kernel_backend(torch.zeros(3)) == "torch"                    # an operation without a C kernel
    assert kernel_backend(torch.zeros(3, dtype=torch.float16), native=True) == "torch"   # C takes fp32, bf16
    assert kernel_backend(torch.zeros(3, 2).t(), native=True) == "torch"                 # and contiguous
    clean_env.setenv("WORKBENCH_NATIVE", "0")
    assert kernel_backend(torch.zeros(3), native=True) == "torch"


@pytest.mark.parametrize("env, backend", [
    ({"WORKBENCH_KERNELS": "reference"}, "reference"),
    ({"WORKBENCH_KERNELS": "triton"}, "triton"),
    ({"WORKBENCH_KERNELS": "cpu", "WORKBENCH_NATIVE": "0"}, "torch"),
    ({"WORKBENCH_KERNELS": "auto", "WORKBENCH_NATIVE": "0"}, "torch"),
    ({"TRITON_INTERPRET": "1"}, "triton"),
    ({"TRITON_INTERPRET": "0", "WORKBENCH_NATIVE": "0"}, "torch"),
])
def test_environment_forces_a_backend(clean_env, env, backend):
    for key, value in env.items():
        clean_env.setenv(key, value)
    assert kernel_backend(torch.zeros(3), native=True) == backend


def test_describe_names_what_ran(clean_env):
    assert describe("c") == "C kernels (kernels/cpu_native.c)"
    assert describe("reference").startswith("plain PyTorch references")
    clean_env.setenv("WORKBENCH_NATIVE", "0")
    assert describe("torch") == "chunked PyTorch kernels (WORKBENCH_NATIVE=0)"


def test_unknown_backend_is_an_error(clean_env):
    clean_env.setenv("WORKBENCH_KERNELS", "gpu")
    with pytest.raises(KernelBackendError, match="WORKBENCH_KERNELS"):
        kernel_backend(torch.zeros(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tensors_take_triton(clean_env):
    assert kernel_backend(torch.zeros(3, device="cuda"), native=True) == ("triton" if triton_available() else "torch")


def test_forced_triton_leaves_the_environment_alone(clean_env):
    if not triton_available():
        pytest.skip("triton is not installed")
    clean_env.setenv("WORKBENCH_KERNELS", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = torch.zeros(10, device=device)
    ties_merge(base, [torch.ones(10, device=device)], method="task_arithmetic")
    assert "TRITON_INTERPRET" not in os.environ
    clean_env.delenv("WORKBENCH_KERNELS")
    assert kernel_backend(base.cpu()) == "torch"


def test_import_does_not_import_triton():
    result = run_python("import sys, workbench.kernels; print('triton' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_without_triton_the_cpu_path_works_and_forcing_triton_explains():
    code = """
import sys
sys.modules["triton"] = None                      # as if Triton were not installed
import torch
from workbench.kernels.dispatch import KernelBackendError
from workbench.kernels.ties import ties_merge
out, _ = ties_merge(torch.zeros(4), [torch.ones(4)], method="task_arithmetic")
assert out.tolist() == [1.0] * 4
import os
os.environ["WORKBENCH_KERNELS"] = "triton"
try:
    ties_merge(torch.zeros(4), [torch.ones(4)], method="task_arithmetic")
except KernelBackendError as exc:
    print("error:", exc)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "error: the Triton backend was forced" in result.stdout


def test_triton_imported_too_early_is_explained():
    if not triton_available():
        pytest.skip("triton is not installed")
    code = """
import triton                                     # compiled mode: no TRITON_INTERPRET
import torch
from workbench.kernels.dispatch import KernelBackendError
from workbench.kernels.layer_swap import lerp_
import os
os.environ["WORKBENCH_KERNELS"] = "triton"
try:
    lerp_(torch.zeros(4), torch.ones(4), 0.5)
except KernelBackendError as exc:
    print("error:", exc)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "needs its interpreter" in result.stdout


def _codegen(*args) -> subprocess.CompletedProcess:
    script = Path(__file__).with_name("gpu_codegen.py")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})


def test_jitted_objects_keep_their_constexprs():
    """What a CUDA launch calls: every jitted object (found by scanning the kernel modules) flags as constexpr
    exactly the parameters its source annotates tl.constexpr. The interpreter ignores annotations, so only
    this sees a kernel that lost them (every GPU launch would fail)."""
    if not triton_available():
        pytest.skip("triton is not installed")
    result = _codegen("--constexprs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked" in result.stdout and " 0 jitted" not in result.stdout


def test_kernels_compile_for_a_gpu():
    """Real Triton (not the interpreter) compiles every kernel to sm_90 code, offline, as the launchers call it;
    specialized as for 16·k elements, the PTX keeps what the kernels were written for: no block-wide barrier
    in the main loop of the merge (without partial ties), layer-swap and DARE kernels, and 16-byte loads in
    delta_stats where its tiles are aligned."""
    if not triton_available():
        pytest.skip("triton is not installed")
    result = _codegen("--ptx-stats")
    said = result.stdout + result.stderr
    if result.returncode != 0 and "ptxas" in said and "not found" in said:
        pytest.skip("this Triton build has no ptxas")
    if result.returncode != 0 and "only 0-dimensional arrays can be converted" in said:
        # Seen with Triton 3.6.0 and numpy 2.4 (an H200 machine, 2026-12-04): that interpreter, which records
        # the launches, converts 1-element arrays to ints, which numpy 2.4 refuses (numpy 2.2 works).
        pytest.skip(f"this Triton's interpreter cannot record launches with numpy {np.__version__}; on a GPU the "
                    f"kernel tests compile every launch for real")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled" in result.stdout and "FAIL" not in result.stdout
    seen = {"merge": 0, "elementwise": 0, "aligned stats": 0}
    for line in result.stdout.splitlines():
        if not line.startswith("ok "):
            continue
        stats = json.loads(line[line.rindex("{"):line.rindex("}") + 1])
        if "_ties_kernel" in line and "'EXACT': False" in line and "'LANE_TALLIES': True" in line:
            assert stats["loop_bar_sync"] == 0, line
            seen["merge"] += 1
        elif "_lerp_kernel" in line or "_dare_kernel" in line:
            assert stats["loop_bar_sync"] == 0, line
            seen["elementwise"] += 1
        elif "_delta_stats_kernel" in line and "'ALIGNED': True" in line:
            assert stats["b16_loads"] == 0 and stats["v4_loads"] > 0, line
            seen["aligned stats"] += 1
    assert all(seen.values()), seen
