"""Which implementation runs: Triton, the C kernels, the chunked PyTorch pieces, or the plain references.

`kernel_backend` is the one decision every kernel module asks, and its answer is what the merge report
names:
- "triton": CUDA tensors when Triton is installed; ``TRITON_INTERPRET=1`` or ``WORKBENCH_KERNELS=triton``
  forces it on CPU tensors (Triton's interpreter: how the kernels are tested without a GPU).
- "c": CPU tensors the C kernels take (kernels/cpu_native.c: fp32 or bf16, contiguous), for operations
  that have one, unless ``WORKBENCH_NATIVE=0`` or the library cannot be built.
- "torch": the chunked, vectorized PyTorch pieces: every other CPU case, and CUDA without Triton
  (the pieces are device-agnostic).
- "reference": ``WORKBENCH_KERNELS=reference`` forces the plain references (the readable formulas).
``WORKBENCH_KERNELS=cpu`` forces the CPU path ("c" where it applies, else "torch") on any device.

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

from . import cpu_native

BACKENDS = ("triton", "c", "torch", "reference")
_MODES = ("auto", "triton", "cpu", "reference")
_TRUE = ("1", "true", "on", "yes")
# The largest finite fp32 (FLT_MAX): |x| <= FLT_MAX is false exactly for NaN and ±Inf. The C kernels
# define it once in cpu_native.c; the Triton kernels take it from here.
FLT_MAX = 3.4028234663852886e38


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


def kernel_backend(*tensors: torch.Tensor | None, native: bool = False, triton: bool = True) -> str:
    """The implementation that runs for an operation on `tensors` (None entries are skipped): "triton",
    "c", "torch" or "reference". native: whether the operation has a C kernel for these arguments;
    triton: whether its Triton kernel takes them (where it does not, the PyTorch pieces run)."""
    mode = _mode()
    if mode == "reference":
        return "reference"
    if triton and (mode == "triton" or (mode == "auto" and _interpret_requested())):
        return "triton"
    first = next((t for t in tensors if t is not None), None)
    if triton and mode == "auto" and first is not None and first.is_cuda and triton_available():
        return "triton"
    if native and cpu_native.takes(*tensors):
        return "c"
    return "torch"


def describe(backend: str) -> str:
    """The backend in words, for reports: what ran, and for the PyTorch pieces on CPU why not C."""
    if backend == "triton":
        interpreted = "triton" in sys.modules and _interpreter_loaded(sys.modules["triton"])
        return "Triton (interpreter)" if interpreted else "Triton"
    if backend == "c":
        return "C kernels (kernels/cpu_native.c)"
    if backend == "reference":
        return "plain PyTorch references (WORKBENCH_KERNELS=reference)"
    reason = cpu_native.why()
    return reason if reason.startswith("chunked PyTorch") else "chunked PyTorch kernels"


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
        # Module constants (upper-case int/float names, e.g. FLT_MAX) become tl.constexpr: the only globals
        # a compiled kernel may read. A helper imported from another kernel module runs in this scope, so
        # its home module's constants come too; this module's own win where both define a name.
        homes = {module_globals[n].__module__ for n in names} - {key}
        for home in [vars(sys.modules[m]) for m in sorted(homes) if m in sys.modules] + [module_globals]:
            for name, value in home.items():
                if name.isupper() and isinstance(value, (int, float)) and not isinstance(value, bool):
                    scope[name] = triton.language.constexpr(value)
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
