"""The C kernels of the CPU path (`cpu_native.c`): the TIES / task-arithmetic / linear pass, the radix
histogram passes, the tie count and the non-finite count, one fused pass over each tensor with no temporaries.

The chunked PyTorch pieces (ties_cpu.py, topk_threshold.py) cost one memory round trip of a piece-sized
temporary per operation; the C pass reads each input once and writes the output once. The library is
built at first use with the system C compiler (`$CC`, else `cc`), as Triton builds its launchers, into
`$WORKBENCH_CACHE/native/` (default ~/.cache/workbench), keyed by a hash of the source and the flags, and
loaded with ctypes. ctypes releases the GIL, so element ranges run on `torch.get_num_threads()` Python
threads side by side (integer counts: the split changes no result).

The C side's parameters are structs (`wb_merge_args`, `wb_expert`, `wb_hist_args`) mirrored here as
`ctypes.Structure`s; `wb_abi` reports their sizes and the enum bounds, and a library whose layout differs
from the mirror is refused. Where the C kernels cannot run (no compiler, a failed build, fp16 or
non-contiguous tensors, `WORKBENCH_NATIVE=0`), the PyTorch pieces run instead, with the same bits: both
are tested against the plain references. `dispatch.kernel_backend` makes that choice.
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

import numpy as np
import torch

from .merge_codes import Count, Method

SOURCE = Path(__file__).with_name("cpu_native.c")
# No FMA contraction and no fast-math: each fp32 operation rounds exactly as PyTorch's does.
FLAGS = ["-O3", "-march=native", "-std=gnu99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}   # enum wb_dtype
MIN_SPLIT = 1 << 16  # elements per thread below which one thread does the whole tensor
_TRUE_OFF = ("0", "false", "off", "no")

_lib = None
_error: str | None = None
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0

_i32, _i64, _u32, _f32, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_uint32, ctypes.c_float, ctypes.c_void_p


class Expert(ctypes.Structure):
    """`wb_expert`: one expert of a merge over one element range (quotas: ties at τ kept in the range)."""

    _fields_ = [("data", _ptr), ("dtype", _i32), ("weight", _f32), ("keep_tau", _f32), ("protect_tau", _f32),
                ("keep_quota", _i64), ("protect_quota", _i64), ("dare_k0", _u32), ("dare_k1", _u32),
                ("dare_threshold", _u32), ("dare_scale", _f32)]


class MergeArgs(ctypes.Structure):
    """`wb_merge_args`: one merge pass over elements [start, end)."""

    _fields_ = [("start", _i64), ("end", _i64), ("base", _ptr), ("base_dtype", _i32), ("out", _ptr),
                ("out_dtype", _i32), ("method", _i32), ("num_experts", _i32), ("count_consensus", _i32),
                ("normalize", _i32), ("has_protect", _i32), ("lam", _f32), ("experts", ctypes.POINTER(Expert)),
                ("counts", ctypes.POINTER(_i64))]


class HistArgs(ctypes.Structure):
    """`wb_hist_args`: one radix histogram pass over elements [start, end)."""

    _fields_ = [("start", _i64), ("end", _i64), ("base", _ptr), ("expert", _ptr), ("base_dtype", _i32),
                ("expert_dtype", _i32), ("shift", _i32), ("width", _i32), ("num_prefixes", _i32),
                ("prefixes", ctypes.POINTER(_i64)), ("hist", ctypes.POINTER(_i64))]


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


def takes(*tensors) -> bool:
    """Whether the C kernels run for these tensors (None entries are skipped): enabled, built, and every
    tensor on the CPU, contiguous, fp32 or bf16."""
    return all(t is None or (t.device.type == "cpu" and t.dtype in DTYPES and t.is_contiguous())
               for t in tensors) and library() is not None


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
    lib.wb_abi.restype, lib.wb_abi.argtypes = _i64, [ctypes.c_int]
    lib.wb_merge.restype, lib.wb_merge.argtypes = _i64, [ctypes.POINTER(MergeArgs)]
    lib.wb_radix_hist.restype, lib.wb_radix_hist.argtypes = None, [ctypes.POINTER(HistArgs)]
    lib.wb_count_equal.restype = _i64
    lib.wb_count_equal.argtypes = [_i64, _i64, _ptr, _i32, _ptr, _i32, _f32]
    lib.wb_nonfinite.restype, lib.wb_nonfinite.argtypes = _i64, [_i64, _i64, _ptr, _i32]
    mirror = {1: ctypes.sizeof(Expert), 2: ctypes.sizeof(MergeArgs), 3: ctypes.sizeof(HistArgs),
              4: len(Count), 5: int(Method.LINEAR)}
    for what, size in mirror.items():
        if lib.wb_abi(what) != size:
            raise RuntimeError(f"{path.name}: wb_abi({what}) = {lib.wb_abi(what)}, the Python mirror says {size}")
    return lib


def max_experts() -> int:
    lib = library()
    return int(lib.wb_abi(0)) if lib is not None else 0


def ranges(n: int) -> list[tuple[int, int]]:
    """The element ranges the C kernels split [0, n) into: `torch.get_num_threads()` equal ranges (one for
    small n). A merge and a selection of the same tensor get the same ranges, so the selection's per-range
    tie counts give the merge each range's quota."""
    parts = max(1, min(torch.get_num_threads(), n // MIN_SPLIT))
    step = max(1, -(-n // parts))
    return [(s, min(s + step, n)) for s in range(0, n, step)] or [(0, 0)]


def segment(n: int) -> int:
    """Elements per range of `ranges(n)` (the last may be shorter)."""
    first = ranges(n)[0]
    return max(1, first[1] - first[0])


def _parallel(parts: list, fn) -> list:
    """fn(part) for each part, on a thread pool (ctypes releases the GIL); the results in order."""
    global _pool, _pool_pid
    if len(parts) == 1:
        return [fn(parts[0])]
    if _pool is None or _pool_pid != os.getpid():  # a forked child has the pool but not its threads
        _pool = ThreadPoolExecutor(max_workers=max(2, len(parts)), thread_name_prefix="workbench-cpu")
        _pool_pid = os.getpid()
    futures = [_pool.submit(fn, part) for part in parts]  # (more parts than workers queue up)
    return [f.result() for f in futures]


def _np_i64(a: np.ndarray):
    """A C-contiguous int64 numpy array as an int64*. The C side's buffers are numpy, not torch: a torch op
    (even zeros or sum) is an OpenMP region that stalls whenever another process holds a core."""
    return a.ctypes.data_as(ctypes.POINTER(_i64))


def merge(base, experts, p, out, quotas, dare=None) -> torch.Tensor | None:
    """ties.py's pass into `out`, over `ranges(n)`; counts [T, len(Count)] int64, or None if a result
    was NaN (recompute elsewhere: PyTorch's NaN rounding is not reproduced here).

    p: ties.MergeParams. quotas: per range, per expert, (ties its keep takes, ties its protect takes),
    from ties.range_quotas. dare: None, or per expert (k0, k1, drop threshold, scale) from dare.py (threshold 0:
    no drop): the experts are dropped and rescaled on the fly, as `dare_` would have left them, and never
    written.
    """
    lib = library()
    T = len(experts)
    base_ptr, base_dtype = (base.data_ptr(), DTYPES[base.dtype]) if base is not None else (None, 0)
    parts = ranges(out.numel())

    def run(index):
        start, end = parts[index]
        row = (Expert * T)()
        for t, e in enumerate(experts):
            k0, k1, threshold, scale = dare[t] if dare is not None else (0, 0, 0, 1.0)
            row[t] = Expert(e.data_ptr(), DTYPES[e.dtype], p.weights[t], p.keep_taus[t], p.protect_taus[t],
                            quotas[index][t][0], quotas[index][t][1], k0, k1, threshold, scale)
        counts = np.zeros((T, len(Count)), dtype=np.int64)
        args = MergeArgs(start, end, base_ptr, base_dtype, out.data_ptr(), DTYPES[out.dtype], int(p.method), T,
                         int(p.count_consensus), int(p.normalize), int(p.has_protect), p.lam, row, _np_i64(counts))
        return counts, lib.wb_merge(ctypes.byref(args))

    results = _parallel(list(range(len(parts))), run)
    return None if any(nans for _, nans in results) else torch.from_numpy(sum(counts for counts, _ in results))


def radix_hist(base, expert, shift: int, width: int, prefixes: list[int]) -> np.ndarray:
    """One radix pass per range of `ranges(n)`: int64 [ranges, max(1, len(prefixes)), 2**width] counts of
    the digit (key >> shift) & (2**width − 1) over the elements whose key's higher bits equal each prefix
    (all elements when `prefixes` is empty)."""
    lib = library()
    wanted = np.array(list(prefixes) or [0], dtype=np.int64)
    parts = ranges(base.numel())
    rows = np.zeros((len(parts), max(1, len(prefixes)), 1 << width), dtype=np.int64)

    def run(index):
        start, end = parts[index]
        args = HistArgs(start, end, base.data_ptr(), expert.data_ptr(), DTYPES[base.dtype], DTYPES[expert.dtype],
                        shift, width, len(prefixes), _np_i64(wanted), _np_i64(rows[index]))
        lib.wb_radix_hist(ctypes.byref(args))

    _parallel(list(range(len(parts))), run)
    return rows


def count_equal(base, expert, tau: float) -> list[int]:
    """Per range of `ranges(n)`, the elements whose key (|δ|, non-finite as 0) equals τ."""
    lib = library()
    b, e = (base.data_ptr(), DTYPES[base.dtype]), (expert.data_ptr(), DTYPES[expert.dtype])
    return _parallel(ranges(base.numel()), lambda r: lib.wb_count_equal(r[0], r[1], *b, *e, tau))


def count_nonfinite(t: torch.Tensor) -> int:
    """How many elements of `t` are NaN or ±Inf (0 for integer tensors): one pass, no bool temporary."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    if not takes(t):
        return sum(int(piece.numel() - torch.isfinite(piece).count_nonzero())
                   for piece in t.reshape(-1).split(1 << 20))
    lib = library()
    return sum(_parallel(ranges(t.numel()), lambda r: lib.wb_nonfinite(r[0], r[1], t.data_ptr(), DTYPES[t.dtype])))
