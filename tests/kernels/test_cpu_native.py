"""The CPU path's C kernels (kernels/cpu_native.c): built once into the cache, refused cleanly without a
compiler (the PyTorch pieces then run), and NaN results left to PyTorch's rounding."""
import pytest
import torch

from workbench.kernels import cpu_native
from workbench.kernels.ties import ties_merge
from workbench.kernels.topk_threshold import topk_select
from workbench.kernels.ties import ties_merge_reference
from workbench.kernels.topk_threshold import topk_select_reference


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """The module as on first use, building into an empty cache."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WORKBENCH_KERNELS", "cpu")
    monkeypatch.delenv("WORKBENCH_NATIVE", raising=False)
    monkeypatch.setattr(cpu_native, "_lib", None)
    monkeypatch.setattr(cpu_native, "_error", None)
    return tmp_path / "cache" / "native"


def test_the_library_is_built_once_into_the_cache(fresh_build):
    if cpu_native.library() is None:
        pytest.skip(cpu_native.why())
    built = sorted(fresh_build.glob("cpu_native-*.so"))
    assert len(built) == 1 and not list(fresh_build.glob(".*tmp"))
    assert cpu_native.why() == "C kernels (kernels/cpu_native.c)"
    assert cpu_native._build() == built[0]  # a second build finds the file


def test_without_a_compiler_the_pytorch_pieces_run(fresh_build, monkeypatch, gen):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    base = torch.randn(70001, generator=gen).bfloat16()
    experts = [(base.float() + torch.randn(70001, generator=gen) * 0.01).bfloat16() for _ in range(2)]
    keep = [topk_select(base, e, [0.3])[0] for e in experts]
    got, counts = ties_merge(base, experts, keep=keep)
    assert cpu_native.library() is None and "could not be built" in cpu_native.why()
    assert "no-such-cc" in cpu_native.why() and counts.backend == "torch"
    want, want_counts = ties_merge_reference(base, experts, keep=keep)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)) and counts == want_counts
    assert keep == [topk_select_reference(base, e, [0.3])[0] for e in experts]
    monkeypatch.setenv("WORKBENCH_NATIVE", "0")
    assert cpu_native.why() == "chunked PyTorch kernels (WORKBENCH_NATIVE=0)"


def test_nan_results_take_pytorchs_rounding(cpu_backend, gen):
    # A NaN in the base makes a NaN result, whose bf16 bits are PyTorch's; non-finite deltas count as 0.
    base = torch.randn(100003, generator=gen).bfloat16()
    experts = [(base.float() + torch.randn(100003, generator=gen) * 0.01).bfloat16() for _ in range(2)]
    base[5] = float("nan")
    base[99999] = float("-inf")
    for method in ("ties", "task_arithmetic"):
        got, counts = ties_merge(base, experts, method=method)
        want, want_counts = ties_merge_reference(base, experts, method=method)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), method
        assert counts == want_counts and counts.nonfinite == [2, 2]


def test_count_nonfinite_counts_nan_and_inf(cpu_backend, gen, dtype):  # fp32, fp16 (PyTorch), bf16
    from workbench.kernels.cpu_native import count_nonfinite

    t = torch.randn(300007, generator=gen).to(dtype)
    where = torch.randint(300007, (40,), generator=gen).unique()
    for k, i in enumerate(where.tolist()):
        t[i] = (float("nan"), float("inf"), float("-inf"))[k % 3]
    assert count_nonfinite(t) == len(where) == int((~torch.isfinite(t)).sum())
    assert count_nonfinite(t[::3]) == int((~torch.isfinite(t[::3])).sum())  # a strided view
    assert count_nonfinite(torch.zeros(0, dtype=dtype)) == 0 and count_nonfinite(torch.arange(5)) == 0


def _count_in_child(t):
    return cpu_native.count_nonfinite(t)


def test_a_forked_child_runs_the_threaded_c_kernels(monkeypatch, gen):
    # The thread pool is per process: a child forked after the parent used it (DataLoader workers,
    # datasets' num_proc) builds its own instead of waiting on threads that fork did not copy.
    import multiprocessing

    monkeypatch.setenv("WORKBENCH_KERNELS", "cpu")
    if cpu_native.library() is None:
        pytest.skip(cpu_native.why())
    t = torch.randn(300007, generator=gen)
    t[::1000] = float("nan")
    assert cpu_native.count_nonfinite(t) == 301  # the parent's pool is up
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_count_in_child, (t,)).get(timeout=20) == 301


def test_the_cache_is_workbenchs_cache(monkeypatch, tmp_path):
    # cpu_native resolves the cache root itself (the kernels import nothing above them): the same place.
    from workbench.provenance import cache_dir

    for value in (str(tmp_path / "c"), ""):
        monkeypatch.setenv("WORKBENCH_CACHE", value)
        assert cpu_native._cache_root() == cache_dir() / "native"


def test_more_experts_than_the_c_kernels_take_run_on_the_pytorch_pieces(cpu_backend, gen):
    T = (cpu_native.max_experts() if cpu_native.library() is not None else 16) + 1
    base = torch.randn(4099, generator=gen).bfloat16()
    experts = [(base.float() + torch.randn(4099, generator=gen) * 0.01).bfloat16() for _ in range(T)]
    got, counts = ties_merge(base, experts, method="task_arithmetic")
    want, want_counts = ties_merge_reference(base, experts, method="task_arithmetic")
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)) and counts == want_counts
    assert counts.backend == "torch"


def test_the_c_enums_and_structs_mirror_pythons(monkeypatch):
    # One definition per language, checked against each other: the enums by name and value, the structs
    # by the sizes the library reports (a library whose layout differs is refused when it loads).
    import re

    from workbench.kernels.merge_codes import Count, Method

    source = cpu_native.SOURCE.read_text()

    def c_enum(name):
        body = re.search(r"enum %s \{([^}]*)\}" % name, source).group(1)
        return [part.strip() for part in re.sub(r"/\*.*?\*/", "", body, flags=re.S).split(",") if part.strip()]

    assert c_enum("wb_method") == [f"WB_{m.name} = {m.value}" for m in Method]
    assert c_enum("wb_count") == [f"WB_{c.name}" for c in Count] + ["WB_COUNTS"]
    assert [int(c) for c in Count] == list(range(len(Count)))        # C numbers them from 0 in order
    monkeypatch.setenv("WORKBENCH_KERNELS", "cpu")
    lib = cpu_native.library()
    if lib is None:
        pytest.skip(cpu_native.why())
    import ctypes

    assert [lib.wb_abi(i) for i in range(1, 6)] == [ctypes.sizeof(cpu_native.Expert),
                                                     ctypes.sizeof(cpu_native.MergeArgs),
                                                     ctypes.sizeof(cpu_native.HistArgs), len(Count),
                                                     int(Method.LINEAR)]


@pytest.mark.parametrize("n", [1, 255, 257, 70001])
def test_the_c_radix_pass_counts_what_the_pytorch_pass_counts(gen, n):
    """Each prefix row, bit for bit, including prefixes that match no key (none, too wide, negative)."""
    if cpu_native.library() is None:
        pytest.skip(cpu_native.why())
    from workbench.kernels import radix_passes
    base = torch.randn(n, generator=gen).bfloat16()
    expert = (base.float() + torch.randn(n, generator=gen) * 0.01).bfloat16()
    expert[:: 7] = base[:: 7]                           # δ = 0: key 0
    keys = radix_passes.abs_delta_key(base, expert).to(torch.int64)
    for shift, width in [(16, 15), (0, 16), (8, 8), (20, 12)]:   # (20, 12): no bits above
        above = shift + width
        real = sorted(set((keys >> above).tolist()))[:3]
        for prefixes in ([], real, real[::-1], [real[0], real[0]], [1 << (32 - above), -1], [12345] + real):
            got = cpu_native.radix_hist(base, expert, shift, width, prefixes).sum(0)
            want = radix_passes.torch_pass(base, expert, shift, width, prefixes)[0].numpy()
            assert (got == want).all(), (shift, width, prefixes)
