"""The C kernels of the CPU path (`cpu_native.c`): the TIES / task-arithmetic / linear pass and the radix
histograms, one fused pass over each tensor with no temporaries.

The chunked PyTorch pieces (ties_cpu.py, topk_threshold.py) cost one memory round trip of a 128K-element
temporary per operation, ~40 operations for a TIES piece; the C pass reads each input once and writes the
output once. The library is built at first use with the system C compiler (`$CC`, else `cc`), as Triton
builds its launchers, into `$WORKBENCH_CACHE/native/` (default ~/.cache/workbench), keyed by a hash of the
source and the flags, and loaded with ctypes. ctypes releases the GIL, so element ranges run on
`torch.get_num_threads()` Python threads side by side (integer counts: the split changes no result).

Where it cannot run (no compiler, a failed build, fp16 or non-contiguous tensors, `WORKBENCH_NATIVE=0`)
the PyTorch pieces run instead, with the same bits: both are tested against the plain references.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_native.c")
# No FMA contraction and no fast-math: each fp32 operation rounds exactly as PyTorch's does.
FLAGS = ["-O3", "-march=native", "-std=gnu99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]
CODES = {torch.float32: 0, torch.bfloat16: 1}
MIN_SPLIT = 1 << 16  # elements per thread below which one thread does the whole tensor
_TRUE_OFF = ("0", "false", "off", "no")

_lib = None
_error: str | None = None
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0

_i64, _int, _ptr, _f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float


def enabled() -> bool:
    return os.environ.get("WORKBENCH_NATIVE", "1").strip().lower() not in _TRUE_OFF


def library():
    """The loaded library, or None where it is disabled or cannot be built (then `why()` says why)."""
    global _lib, _error
    if not enabled():
        return None
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                try:
                    _lib = _load(_build())
                except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                    _error = str(exc)
    return _lib


def why() -> str:
    """One line: which CPU kernels run, and if not the C ones, why."""
    if not enabled():
        return "chunked PyTorch kernels (WORKBENCH_NATIVE=0)"
    if library() is not None:
        return "C kernels (kernels/cpu_native.c)"
    return f"chunked PyTorch kernels (the C kernels could not be built: {_error})"


def _cache_root() -> Path:
    # workbench.provenance.cache_dir()'s root, resolved here: the kernels import nothing of the app above them
    # (a test checks that the two agree).
    root = os.environ.get("WORKBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "workbench")
    return Path(root) / "native"


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    source = SOURCE.read_bytes()
    # -march=native: the key names this CPU too, so a cache shared between machines never loads code
    # built for another instruction set.
    key = hashlib.sha256(source + "\0".join([compiler, _cpu_identity()] + FLAGS).encode()).hexdigest()[:16]
    target = _cache_root() / f"cpu_native-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True,
                             text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: a concurrent build finds a whole file or none
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _cpu_identity() -> str:
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return platform.machine() + "|" + "|".join(sorted(set(wanted)))
    except OSError:
        return platform.machine() + "|" + platform.processor()


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    lib.wb_ties.restype = _i64
    lib.wb_ties.argtypes = [_i64, _i64, _ptr, _int, ctypes.POINTER(_ptr), ctypes.POINTER(_int), _int,
                            ctypes.POINTER(_f32), _f32, _int, _int, _int, _int, _ptr, _int, ctypes.POINTER(_i64),
                            ctypes.POINTER(_i64), ctypes.POINTER(_f32)]
    lib.wb_max_experts.restype = _int
    lib.wb_max_experts.argtypes = []
    lib.wb_nonfinite.restype = _i64
    lib.wb_nonfinite.argtypes = [_i64, _i64, _ptr, _int]
    lib.wb_hist_high.restype = None
    lib.wb_hist_high.argtypes = [_i64, _i64, _ptr, _int, _ptr, _int, ctypes.POINTER(_i64)]
    lib.wb_hist_low.restype = None
    lib.wb_hist_low.argtypes = [_i64, _i64, _ptr, _int, _ptr, _int, ctypes.POINTER(_i64), _int,
                                ctypes.POINTER(_i64)]
    return lib


def supports(*tensors) -> bool:
    """Whether the C kernels take these tensors (None entries are skipped): CPU, contiguous, fp32 or bf16."""
    return all(t is None or (t.device.type == "cpu" and t.dtype in CODES and t.is_contiguous())
               for t in tensors)


def _parallel(n: int, fn) -> list:
    """fn(start, end) over `torch.get_num_threads()` disjoint ranges of [0, n) (one for small n), on a
    thread pool (ctypes releases the GIL); the results in range order."""
    global _pool, _pool_pid
    parts = max(1, min(torch.get_num_threads(), n // MIN_SPLIT))
    step = max(1, -(-n // parts))
    ranges = [(s, min(s + step, n)) for s in range(0, n, step)] or [(0, 0)]
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    if _pool is None or _pool_pid != os.getpid():  # a forked child has the pool but not its threads
        _pool = ThreadPoolExecutor(max_workers=max(2, len(ranges)), thread_name_prefix="workbench-cpu")
        _pool_pid = os.getpid()
    futures = [_pool.submit(fn, s, e) for s, e in ranges]  # (more ranges than workers queue up)
    return [f.result() for f in futures]


def _i64_ptr(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(_i64))


def ties(base, experts, p, out, dare=None) -> torch.Tensor | None:
    """ties.py's pass into `out`; counts [T, 4] int64, or None if a result was NaN (recompute elsewhere:
    PyTorch's NaN rounding is not reproduced here) or the C kernels do not take these tensors.

    dare: None, or per expert (k0, k1, drop threshold, scale) from dare.py (threshold 0: no drop): the
    experts are dropped and rescaled on the fly, as `dare_` would have left them, and never written.
    """
    lib = library()
    T = len(experts)
    if lib is None or T > lib.wb_max_experts() or not supports(base, out, *experts):
        return None
    if dare is not None:
        dare_keys = torch.tensor([[k0, k1, thr] for k0, k1, thr, _ in dare], dtype=torch.int64)
        dare_scale = torch.tensor([scale for *_, scale in dare], dtype=torch.float32)
        dare_args = (_i64_ptr(dare_keys), ctypes.cast(dare_scale.data_ptr(), ctypes.POINTER(_f32)))
    else:
        dare_args = (None, None)
    params = torch.tensor([[w, hi, lo] for w, hi, lo in zip(p.weights, p.tau_hi, p.tau_lo)], dtype=torch.float32)
    ptrs = (_ptr * T)(*[e.data_ptr() for e in experts])
    codes = (_int * T)(*[CODES[e.dtype] for e in experts])
    fparams = ctypes.cast(params.data_ptr(), ctypes.POINTER(_f32))
    base_ptr, base_code = (base.data_ptr(), CODES[base.dtype]) if base is not None else (None, 0)

    def run(start, end):
        counts = torch.zeros((T, 4), dtype=torch.int64)
        nans = lib.wb_ties(start, end, base_ptr, base_code, ptrs, codes, T, fparams, p.lam, p.method,
                           int(p.count_consensus), int(p.normalize), int(p.has_slack), out.data_ptr(),
                           CODES[out.dtype], _i64_ptr(counts), *dare_args)
        return counts, nans

    results = _parallel(out.numel(), run)
    return None if any(nans for _, nans in results) else sum(counts for counts, _ in results)


def hist_high(base, expert, hist) -> bool:
    """Radix pass 1 into `hist` (int64 [32768]); False if the C kernels do not take these tensors."""
    lib = library()
    if lib is None or not supports(base, expert):
        return False

    def run(start, end):
        part = torch.zeros(hist.shape, dtype=torch.int64)
        lib.wb_hist_high(start, end, base.data_ptr(), CODES[base.dtype], expert.data_ptr(), CODES[expert.dtype],
                         _i64_ptr(part))
        return part

    for part in _parallel(base.numel(), run):
        hist += part
    return True


def hist_low(base, expert, buckets, hist) -> bool:
    """Radix pass 2 into `hist` (int64 [len(buckets), 65536]); False if the C kernels do not take these."""
    lib = library()
    if lib is None or not supports(base, expert):
        return False
    wanted = torch.tensor(list(buckets), dtype=torch.int64)

    def run(start, end):
        part = torch.zeros(hist.shape, dtype=torch.int64)
        lib.wb_hist_low(start, end, base.data_ptr(), CODES[base.dtype], expert.data_ptr(), CODES[expert.dtype],
                        _i64_ptr(wanted), len(buckets), _i64_ptr(part))
        return part

    for part in _parallel(base.numel(), run):
        hist += part
    return True


def count_nonfinite(t: torch.Tensor) -> int:
    """How many elements of `t` are NaN or ±Inf (0 for integer tensors): one pass, no bool temporary."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    lib = library()
    if lib is None or not supports(t):
        return sum(int(piece.numel() - torch.isfinite(piece).count_nonzero())
                   for piece in t.reshape(-1).split(1 << 20))
    return sum(_parallel(t.numel(), lambda start, end: lib.wb_nonfinite(start, end, t.data_ptr(), CODES[t.dtype])))
