"""Which implementation runs: Triton, the fast CPU path, or the plain references.

- CUDA tensors run the Triton kernels (when Triton is installed; otherwise the vectorized PyTorch path,
  which is device-agnostic).
- CPU tensors run the fast CPU path: chunked, vectorized PyTorch.
- ``TRITON_INTERPRET=1`` or ``WORKBENCH_KERNELS=triton`` forces the Triton path on CPU tensors (Triton's
  interpreter; this is how the kernels are tested without a GPU).
- ``WORKBENCH_KERNELS=reference`` forces the plain references; ``WORKBENCH_KERNELS=cpu`` forces the
  vectorized PyTorch path on any device.

Triton is imported lazily, on the first Triton launch, so ``import workbench.kernels`` is fast and works
where Triton is absent. Kernels are written as plain module-level functions marked with :func:`jit`;
:func:`triton_kernels` decorates them with ``triton.jit`` on first use, inside a private copy of the
module's namespace in which ``tl`` is ``triton.language``. Deferring the decoration matters because
``triton.jit`` reads ``TRITON_INTERPRET`` when it runs, and Triton's own library functions read it when
``triton`` is imported. On CPU, :func:`load_triton` imports Triton in interpreter mode itself; that fails
only if something else imported Triton first (then set TRITON_INTERPRET=1 before Python starts).
"""
from __future__ import annotations

import os
import sys
import types
from typing import Any, Callable

import torch

BACKENDS = ("triton", "cpu", "reference")
_MODES = ("auto", "triton", "cpu", "reference")
_TRUE = ("1", "true", "on", "yes")


class KernelBackendError(RuntimeError):
    """A backend was forced (environment) that cannot run here."""


def _mode() -> str:
    mode = os.environ.get("WORKBENCH_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise KernelBackendError(f"WORKBENCH_KERNELS={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def triton_available() -> bool:
    """Whether Triton can be imported (without importing it)."""
    if "triton" in sys.modules:
        return True
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def kernel_backend(tensor: torch.Tensor | None = None) -> str:
    """The backend that runs for `tensor`: "triton", "cpu" (vectorized PyTorch) or "reference"."""
    mode = _mode()
    if mode in ("reference", "cpu"):
        return mode
    if mode == "triton" or _interpret_requested():
        return "triton"
    if tensor is not None and tensor.is_cuda and triton_available():
        return "triton"
    return "cpu"


def _interpreter_loaded(triton) -> bool:
    # Triton's library functions (tl.zeros, tl.sum, ...) are decorated when triton is imported:
    # they are interpreter functions only if TRITON_INTERPRET was set by then.
    return type(triton.language.zeros).__name__ == "InterpretedFunction"


def load_triton(device: torch.device | str = "cpu"):
    """Import Triton for a launch on `device`; on CPU that needs Triton's interpreter.

    If Triton is not imported yet, it is imported with TRITON_INTERPRET=1 set for the import only, so
    its library functions become interpreter functions; the variable is then restored (so that one forced
    Triton call does not force Triton on everything after it) and Triton's own interpret knob is set
    instead, which Triton reads again when it imports submodules at launch time.
    """
    on_cpu = torch.device(device).type == "cpu"
    saved = os.environ.get("TRITON_INTERPRET")
    if on_cpu and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton

        if _interpreter_loaded(triton):
            triton.knobs.runtime.interpret = True     # (this also writes the variable: restored below)
    except ImportError as exc:  # forced Triton without Triton installed
        raise KernelBackendError(
            "the Triton backend was forced (WORKBENCH_KERNELS=triton or TRITON_INTERPRET=1) but Triton "
            "cannot be imported; install triton or unset the variable to use the CPU path") from exc
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    if on_cpu and not _interpreter_loaded(triton):
        raise KernelBackendError(
            "Triton on CPU tensors needs its interpreter, but triton was imported (by something else) "
            "before TRITON_INTERPRET=1 was set; set TRITON_INTERPRET=1 in the environment before Python "
            "starts, or use WORKBENCH_KERNELS=cpu")
    return triton


def jit(fn: Callable) -> Callable:
    """Mark a module-level function as a Triton kernel (or device helper), compiled on first use."""
    fn.__workbench_triton__ = True
    return fn


_COMPILED: dict[str, types.SimpleNamespace] = {}


def triton_kernels(module_globals: dict[str, Any], device: torch.device | str = "cpu") -> types.SimpleNamespace:
    """The module's :func:`jit`-marked functions as Triton kernels, by name (decorated once per module)."""
    triton = load_triton(device)
    key = module_globals["__name__"]
    if key not in _COMPILED:
        # A private scope: the module's globals, with `tl` bound and each marked function replaced by
        # its jitted version, so that kernels calling helpers resolve them to jitted functions too.
        scope = dict(module_globals)
        scope["tl"] = triton.language
        scope["triton"] = triton
        names = [n for n, v in module_globals.items() if getattr(v, "__workbench_triton__", False)]
        for name in names:
            fn = module_globals[name]
            clone = types.FunctionType(fn.__code__, scope, name, fn.__defaults__, fn.__closure__)
            # FunctionType copies neither the annotations nor the keyword defaults: Triton reads
            # `tl.constexpr` from the annotations, so without them every constexpr becomes a runtime
            # argument and compiled kernels fail ("arange's arguments must be of type tl.constexpr").
            # The interpreter ignores annotations: tests/kernels/test_dispatch.py checks the jitted objects.
            clone.__annotations__ = dict(fn.__annotations__)
            clone.__kwdefaults__ = fn.__kwdefaults__
            clone.__qualname__, clone.__doc__ = fn.__qualname__, fn.__doc__
            clone.__module__ = fn.__module__
            scope[name] = triton.jit(clone)     # reads the interpret knob set by load_triton
        _COMPILED[key] = types.SimpleNamespace(**{n: scope[n] for n in names})
    return _COMPILED[key]


# Launch options shared by every kernel. No FMA contraction: a*b + c rounds twice, as in PyTorch and in
# the interpreter, so every backend gives the same bits (the merge kernels are memory-bound; FMA buys nothing).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def flat_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A 1-D contiguous view of `t` (a copy only when `t` is not contiguous): what the Triton launchers take."""
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)


def fp32_scalar(x: float) -> float:
    """`x` rounded to fp32 (as a Python float), so every backend compares and multiplies by the same value."""
    return float(torch.tensor(float(x), dtype=torch.float32))
