"""The house rules, read from the sources: what each folder may import (README, "Architecture"), no module-level
state that carries a run, one definition of each thing, no dead public functions in the pipeline, config and
CLI code."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "workbench", "pipelines")


def sources(*folders):
    """{path relative to the repository: parsed module} of every Python file under the folders."""
    return {p.relative_to(REPO).as_posix(): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for folder in folders for p in sorted((REPO / folder).rglob("*.py"))}


def package_of(path: str) -> str:
    """The installed package of a source file: kernels/ties.py -> workbench.kernels."""
    folder = path.rsplit("/", 1)[0].split("/")
    return ".".join(["workbench"] + folder if folder[0] in ("kernels", "pipelines") else folder)


def imported_modules(tree, package: str = "workbench") -> set:
    """Every module a file imports, at the top or inside functions (relative imports resolved in `package`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def layer(module: str) -> str | None:
    """The project layer a module name belongs to, or None for a library."""
    parts = module.split(".")
    if parts[0] in ("kernels", "pipelines", "languages"):
        return "bare"  # the folders are only ever imported as workbench.<folder>
    if parts[0] != "workbench":
        return None
    if len(parts) > 1 and parts[1] in ("kernels", "pipelines", "cli"):
        return parts[1]
    return "engine"


def file_layer(path: str) -> str:
    if path.startswith("workbench/cli/") or path == "workbench/__main__.py":
        return "cli"
    return {"kernels": "kernels", "pipelines": "pipelines", "workbench": "engine"}[path.split("/")[0]]


# What each layer may import from the project: data flows languages -> pipelines -> workbench -> kernels,
# and the CLI on top starts any of them.
ALLOWED = {
    "kernels": {"kernels"},
    "engine": {"engine", "kernels"},
    "pipelines": {"pipelines", "engine", "kernels"},
    "cli": {"cli", "pipelines", "engine", "kernels"},
}


def test_each_folder_imports_only_the_layers_below_it():
    broken = []
    for path, tree in sources(*FOLDERS).items():
        own = file_layer(path)
        for module in sorted(imported_modules(tree, package_of(path))):
            target = layer(module)
            if target is not None and target not in ALLOWED[own]:
                broken.append(f"{path} ({own}) imports {module} ({target})")
    assert broken == []


def test_the_import_rules_catch_a_violation():
    tree = ast.parse("def f():\n    from workbench.pipelines.adapt import build_graph\nimport kernels.ties\n"
                     "from ..merge import engine\n")
    found = imported_modules(tree, package_of("workbench/evaluation/generation.py"))
    assert found == {"workbench.pipelines.adapt.build_graph", "kernels.ties", "workbench.merge.engine"}
    assert [layer(m) for m in sorted(found)] == ["bare", "engine", "pipelines"]
    assert package_of("kernels/ties.py") == "workbench.kernels"
    assert "pipelines" not in ALLOWED["engine"] and "engine" not in ALLOWED["kernels"]


MUTATORS = {"add", "update", "append", "extend", "insert", "discard", "remove", "pop", "popitem", "clear",
            "setdefault", "difference_update", "intersection_update", "symmetric_difference_update"}


def module_state_writes(tree) -> list:
    """Functions that write module-level state: a `global` statement, or a module-level list, dict or set
    changed in place."""
    containers = set()
    for node in tree.body:
        value = getattr(node, "value", None)
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        mutable = isinstance(value, (ast.List, ast.Dict, ast.Set)) or (
            isinstance(value, ast.Call) and getattr(value.func, "id", "") in ("set", "dict", "list", "defaultdict"))
        if mutable:
            containers.update(t.id for t in targets if isinstance(t, ast.Name))
    writes = []
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(func):
            if isinstance(node, ast.Global):
                writes.append(f"{func.name}: global {', '.join(node.names)}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS
                  and isinstance(node.func.value, ast.Name) and node.func.value.id in containers):
                writes.append(f"{func.name}: {node.func.value.id}.{node.func.attr}(...)")
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                for target in getattr(node, "targets", None) or [getattr(node, "target", None)]:
                    if isinstance(target, ast.Subscript) and getattr(target.value, "id", None) in containers:
                        writes.append(f"{func.name}: {target.value.id}[...] =")
    return writes


def test_no_module_global_carries_run_state():
    """What to rerun, which stages are forced, where a run lives: passed as arguments, never kept in a module."""
    found = {path: writes for path, tree in sources("pipelines", "workbench/cli", "workbench/config").items()
             if (writes := module_state_writes(tree))}
    assert found == {}


def test_the_run_state_check_catches_a_module_global():
    tree = ast.parse("_FORCED: set = set()\ndef force(names):\n    _FORCED.update(names)\n"
                     "def reset():\n    global _x\n")
    assert module_state_writes(tree) == ["force: _FORCED.update(...)", "reset: global _x"]


# The subcommand protocol of workbench/cli/*_cmd.py, and the C kernel the TIES method is named after.
SAME_NAME_ON_PURPOSE = {"add_arguments", "run", "ties"}


def public_functions():
    found = {}
    for path, tree in sources(*FOLDERS).items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                found.setdefault(node.name, []).append(path)
    return found


def test_each_public_function_name_means_one_thing():
    """Two `read_documents` that read different files, two `load_model`s that load for different jobs: one name
    each, so that a reader who finds one knows what the other call does."""
    twice = {name: paths for name, paths in public_functions().items()
             if len(paths) > 1 and name not in SAME_NAME_ON_PURPOSE}
    assert twice == {}


def test_one_duration_format_for_progress_lines():
    defined = [(path, node.name) for path, tree in sources(*FOLDERS).items() for node in tree.body
               if isinstance(node, ast.FunctionDef) and node.name in ("clock", "_clock")]
    assert defined == [("pipelines/runner.py", "clock")]


@pytest.mark.parametrize("folder", ["pipelines", "workbench/cli", "workbench/config"])
def test_no_dead_public_functions(folder):
    """A public function nothing calls (like the `default_run_dir` that outlived its caller) goes."""
    texts = [p.read_text(encoding="utf-8") for root in (*FOLDERS, "tests") for p in (REPO / root).rglob("*.py")]
    dead = []
    for path, tree in sources(folder).items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                uses = sum(len(re.findall(rf"\b{node.name}\b", text)) for text in texts)
                if uses < 2:  # the definition itself
                    dead.append(f"{path}: {node.name}")
    assert dead == []


def function_level_own_imports(tree, lines) -> list:
    """(line number, module, reason) of each import of the project's own modules inside a function."""
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "workbench":
                line = lines[node.end_lineno - 1]
                found.append((node.lineno, node.module, line.split("# lazy:", 1)[1].strip() if "# lazy:" in line
                              else None))
    return sorted(set(found))


def test_the_projects_modules_are_imported_at_the_top():
    """A reader sees what depends on what from a module's top; at most 20 imports of the project's own modules
    stay inside functions, each with a `# lazy: <reason>` comment (a cycle, or keeping a light path light)."""
    lazy, unexplained = [], []
    for path, tree in sources(*FOLDERS).items():
        lines = (REPO / path).read_text(encoding="utf-8").splitlines()
        for lineno, module, reason in function_level_own_imports(tree, lines):
            (lazy if reason else unexplained).append(f"{path}:{lineno}: {module}")
    assert not unexplained, f"imports inside functions without a '# lazy:' reason: {unexplained}"
    assert len(lazy) <= 20, f"{len(lazy)} function-level imports of the project's modules (at most 20): {lazy}"


def test_the_top_import_check_catches_an_unexplained_import():
    code = "def f():\n    from workbench.errors import ConfigError\n    return ConfigError\n"
    found = function_level_own_imports(ast.parse(code), code.splitlines())
    assert found == [(2, "workbench.errors", None)]
    code = code.replace("ConfigError\n    return", "ConfigError  # lazy: a cycle\n    return")
    assert function_level_own_imports(ast.parse(code), code.splitlines()) == [(2, "workbench.errors", "a cycle")]
