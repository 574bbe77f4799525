"""Compile every Triton kernel for an sm_90 GPU without a GPU, as a CUDA launch would call it.

What reaches the GPU must be the objects a launch calls (docs/design.md, "Kernels"): this script takes
each kernel from `triton_kernels(module, "cuda")`, the same call the launchers make, never a list of its own.

    python gpu_codegen.py --constexprs   every jitted object's constexpr parameters are the ones its source
                                          annotates `tl.constexpr` (fast; no compiler)
    python gpu_codegen.py                compile: (1) a child process with TRITON_INTERPRET=1 runs the public
                                          kernel API on small CPU tensors in every dtype and records each
                                          launch's arguments; (2) here, without the interpreter, each recorded
                                          launch is compiled to cubin for sm_90 through the jitted object's own
                                          parameters: constexpr where the object says so, otherwise typed from
                                          the recorded argument (as Triton's launcher would type it)
    python gpu_codegen.py --ptx-stats    compile as above, specialized as a launch on 16·k elements is
                                          (pointers and integers divisible by 16), and print what each
                                          variant's PTX does: block-wide barriers (bar.sync) inside its main
                                          loop and in all, vector and 2-byte global loads

Kernels are found by scanning the kernel modules for functions marked with `dispatch.jit`; every one whose
name ends in `_kernel` must have been launched by the capture. Prints one line per check or compiled
variant; exits non-zero on the first failure.
"""
import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CAPTURE_FLAG = "--capture"


# ------------------------------------------------------------------------------------------- scanning

def kernel_modules() -> list:
    """Every module of the kernels folder, imported (the folder is scanned: no list of names)."""
    import workbench.kernels

    folder = Path(list(workbench.kernels.__path__)[0])
    return [importlib.import_module(f"workbench.kernels.{p.stem}") for p in sorted(folder.glob("*.py"))]


def marked_functions(module) -> dict:
    """{name: plain function} of the functions marked with `dispatch.jit` that `module` defines."""
    return {name: fn for name, fn in vars(module).items()
            if getattr(fn, "__workbench_triton__", False) and fn.__module__ == module.__name__}


def declared_constexprs(fn) -> set:
    """The parameters annotated `tl.constexpr` in the function's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    args = tree.body[0].args
    return {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs
            if a.annotation is not None and ast.unparse(a.annotation) in ("tl.constexpr", "triton.language.constexpr")}


def cuda_objects(module) -> dict:
    """{name: the jitted object a CUDA launch calls} for the module's marked functions."""
    from workbench.kernels.dispatch import triton_kernels

    jitted = triton_kernels(vars(module), "cuda")
    return {name: getattr(jitted, name) for name in marked_functions(module)}


def check_constexprs() -> int:
    checked = 0
    for module in kernel_modules():
        for name, obj in cuda_objects(module).items():
            declared = declared_constexprs(marked_functions(module)[name])
            seen = {p.name for p in obj.params if p.is_constexpr}
            where = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
            if type(obj).__name__ != "JITFunction":
                print(f"FAIL {where}: a CUDA launch would call a {type(obj).__name__}, not a JITFunction")
                return 1
            if seen != declared:
                print(f"FAIL {where}: Triton sees constexpr {sorted(seen)}, the source declares {sorted(declared)}")
                return 1
            print(f"ok {where} constexpr {sorted(seen)}", flush=True)
            checked += 1
    print(f"checked {checked} jitted objects")
    return 0


# -------------------------------------------------------------------------------------------- capture

def _describe(value):
    """A JSON description of one launch argument: enough to type it and to give a constexpr its value."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", "")}
    if isinstance(value, (tuple, list)):
        return {"tuple": [_describe(v) for v in value]}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    if value is None:
        return {"none": None}
    raise TypeError(f"launch argument of type {type(value).__name__}")


def capture(path: str) -> int:
    """Run the public kernel API on small CPU tensors through Triton's interpreter; write each launch."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        launches.append({"module": fn.__module__, "name": fn.__name__, "args": [_describe(a) for a in args],
                         "kwargs": {k: _describe(v) for k, v in kwargs.items()}})
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    os.environ["WORKBENCH_KERNELS"] = "triton"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        exercise(dtype)
    Path(path).write_text(json.dumps(launches), encoding="utf-8")
    return 0


def exercise(dtype):
    """Every public kernel entry point, in the variants that pick different constexprs."""
    import torch

    from workbench.kernels.dare import dare_
    from workbench.kernels.delta_stats import delta_stats
    from workbench.kernels.layer_swap import lerp_
    from workbench.kernels.masks import topk_masks
    from workbench.kernels.ties import ties_merge
    from workbench.kernels.topk_threshold import topk_select, topk_select_multi

    gen = torch.Generator().manual_seed(0)
    steps = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5])        # deltas with ties: exact selections are partial
    base = torch.randn(3000, generator=gen).to(dtype)
    experts = [(base.float() + steps[torch.randint(5, (3000,), generator=gen)]).to(dtype) for _ in range(3)]
    sels = [topk_select(base, e, [0.4, 0.2]) for e in experts]
    topk_select(base, experts[0], [0.4, 0.2], algorithm="radix")    # the bracket's fallback
    keep, protect = [s[0] for s in sels], [s[1] for s in sels]
    loose = [topk_select(base, e, [0.4], ties="keep_all")[0] for e in experts]
    for kwargs in (dict(keep=keep, protect=protect), dict(keep=loose, consensus="count", normalize=False),
                   dict(method="task_arithmetic"), dict(method="linear")):
        ties_merge(None if kwargs.get("method") == "linear" else base, experts, **kwargs)
    many = experts + [experts[0], experts[1]]                        # past ties.LANE_TALLY_EXPERTS
    ties_merge(base, many, keep=keep + keep[:2], protect=protect + protect[:2])
    topk_select_multi(lambda: [(base, experts[0]), (base[:100], experts[1][:100])], [0.3])
    topk_masks(base, experts[0], keep[0], protect[0])
    dare_(experts[0].clone(), base, 0.3, seed=1)
    lerp_(experts[1].clone(), experts[2], 0.25)
    delta_stats([(base, experts[0]), (base[:10], experts[1][:10])])
    big = torch.randn(1 << 16, generator=gen).to(dtype)                  # alone in its launch, 16·k elements
    delta_stats([(big, big + 1)])


# -------------------------------------------------------------------------------------------- compile

def _type(desc) -> str:
    """Triton's signature type for a recorded runtime argument (as the launcher would specialize it)."""
    if "tensor" in desc:
        return "*" + {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int64": "i64",
                      "int32": "i32", "uint8": "u8", "int16": "i16"}[desc["tensor"]]
    if "int" in desc:
        return "i32" if -2**31 <= desc["int"] < 2**31 else "i64"
    if "float" in desc:
        return "fp32"
    if "bool" in desc:
        return "i1"
    raise TypeError(f"cannot type {desc}")


def _value(desc):
    for key in ("int", "float", "bool", "none"):
        if key in desc:
            return desc[key]
    raise TypeError(f"a constexpr cannot be {desc}")


def ptx_stats(ptx: str) -> dict:
    """Counts read off PTX text: bar.sync inside loops (blocks LLVM marks as in a loop) and in all, global
    loads of 16 bytes (ld.global.v4) and of 2 bytes (ld.global.b16)."""
    stats = {"loop_bar_sync": 0, "bar_sync": 0, "v4_loads": 0, "b16_loads": 0}
    in_loop = False
    for line in ptx.splitlines():
        text = line.strip()
        if text.startswith("$L__BB") or text.startswith("// %bb."):
            in_loop = "Loop" in text
        elif text.startswith("//") and "Loop Header" in text:
            in_loop = True
        stats["bar_sync"] += text.startswith("bar.sync")
        stats["loop_bar_sync"] += in_loop and text.startswith("bar.sync")
        stats["v4_loads"] += "ld.global.v4" in text
        stats["b16_loads"] += "ld.global.b16" in text
    return stats


def compile_launch(launch, obj, target, base_options, aligned=False):
    """Compile one recorded launch of `obj` (the CUDA-side jitted object) to cubin; returns the line to print.
    aligned: specialize every pointer and integer argument as divisible by 16 and add the PTX's counts."""
    import triton
    from triton.compiler import ASTSource

    params = obj.params
    values = dict(zip([p.name for p in params], launch["args"]))
    options = dict(base_options)
    for key, desc in launch["kwargs"].items():
        if key in values or any(p.name == key for p in params):
            values[key] = desc
        else:
            options[key] = _value(desc)            # a launch option, e.g. enable_fp_fusion
    signature, constexprs = {}, {}
    for p in params:
        desc = values[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = _value(desc)
        elif "tuple" in desc:
            signature[p.name] = tuple(_type(d) for d in desc["tuple"])
        else:
            signature[p.name] = _type(desc)
    attrs = {}
    if aligned:
        for i, p in enumerate(params):
            kind = signature[p.name]
            for path, t in ([((i, j), u) for j, u in enumerate(kind)] if isinstance(kind, tuple) else [((i,), kind)]):
                if t.startswith("*") or t in ("i32", "i64"):
                    attrs[path] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=obj, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=target, options=options)
    pointers = sorted({t for t in signature.values() if isinstance(t, str) and t.startswith("*")})
    line = f"{launch['name']} {','.join(pointers)} {constexprs}"
    return f"{line} {json.dumps(ptx_stats(kernel.asm['ptx']))}" if aligned else line


def compile_all(aligned: bool = False) -> int:
    from triton.backends.compiler import GPUTarget

    from workbench.kernels.dispatch import LAUNCH_OPTIONS

    with_capture = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_codegen-{os.getpid()}.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, __file__, CAPTURE_FLAG, str(with_capture)], env=env,
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        print("FAIL capture:", run.stdout[-3000:], run.stderr[-3000:])
        return 1
    launches = json.loads(with_capture.read_text(encoding="utf-8"))
    with_capture.unlink()
    objects, kernels = {}, set()
    for module in kernel_modules():
        for name, obj in cuda_objects(module).items():
            objects[(module.__name__, name)] = obj
            if name.endswith("_kernel"):
                kernels.add((module.__name__, name))
    launched = {(launch["module"], launch["name"]) for launch in launches}
    if kernels - launched:
        print(f"FAIL the capture launched no {sorted(kernels - launched)}: add them to exercise()")
        return 1
    target = GPUTarget("cuda", 90, 32)
    seen = set()
    for launch in launches:
        key = json.dumps(launch, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        start = time.time()
        try:
            line = compile_launch(launch, objects[(launch["module"], launch["name"])], target, LAUNCH_OPTIONS,
                                  aligned)
        except Exception as exc:  # noqa: BLE001 (any compiler error is this script's finding)
            print(f"FAIL {launch['name']}: {type(exc).__name__}: {str(exc)[-1500:]}")
            return 1
        print(f"ok {line} {time.time() - start:.2f}s", flush=True)
    print(f"compiled {len(seen)} launches of {len(launched)} kernels")
    return 0


def main(argv) -> int:
    if argv[:1] == [CAPTURE_FLAG]:
        return capture(argv[1])
    assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
    if argv[:1] == ["--constexprs"]:
        return check_constexprs()
    return compile_all(aligned=argv[:1] == ["--ptx-stats"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
