"""The layering rules of the house, read from the code's own imports (ast, nothing is imported):

- the library (`cyclej/`) never imports `prefect`: Prefect is the wrapper layer's business;
- the library never imports the wrapper layer (`flows/`, `tasks/`), but for one door: `cyclej/cli.py`'s
  `prefect_layer()`, through which `cyclej run` and `cyclej serve` hand over (see cyclej/cli.py);
- the library's rooms are layered (`LAYERS`, lowest first): a room imports only rooms of lower layers and
  itself, so no import goes up (the stages use the machinery, never the other way round; the pipeline's
  registry names the stages by string and imports them lazily) and two rooms of one layer are independent;
- no import circles between the library's modules, lazy imports inside functions included;
- no two modules of the project share a base name (`rl.py` beside `stages/rl.py` was the old confusion).

Every import counts, at module level or inside a function, since a lazy import is a dependency too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = "cyclej"
WRAPPER_PACKAGES = ("flows", "tasks")
# (file, function) pairs allowed to import the wrapper layer: the CLI's one door to it.
WRAPPER_DOORS = {("cyclej/cli.py", "prefect_layer")}
# The rooms of the library, lowest layer first; the rooms of one layer do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("config",),
    ("runtime",),  # store, devices, ranks, faults, progress: what every part runs on
    ("corpora", "models"),
    ("training",),
    ("generation", "merging"),
    ("evaluation",),
    ("reinforcement",),
    ("pipeline",),  # the registry, running a stage, the pod sizing
    ("stages",),
    ("cli",),
]
LAYER_OF = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the root, e.g. "cyclej/train.py"
    line: int
    module: str  # the absolute module imported, e.g. "cyclej.stages" or "prefect.artifacts"
    function: str | None  # the function the import stands in, None at module level


def module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path, rel: str) -> list[Import]:
    """Every import in one file, with relative imports made absolute and `from pkg import sub` counted as
    an import of `pkg.sub` too (it may be a submodule)."""
    tree = ast.parse((root / rel).read_text(encoding="utf-8"), filename=rel)
    package = module_name(rel) if rel.endswith("__init__.py") else module_name(rel).rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inside = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Import):
                found.extend(Import(rel, child.lineno, a.name, function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append(Import(rel, child.lineno, base, function))
                found.extend(Import(rel, child.lineno, f"{base}.{a.name}", function) for a in child.names)
            visit(child, inside)

    visit(tree, None)
    return found


def room_of(module: str) -> str | None:
    """`cyclej.training.trainer` -> `training`; `cyclej.cli` -> `cli`; None outside the library."""
    parts = module.split(".")
    return parts[1] if parts[0] == LIBRARY and len(parts) > 1 else None


def same_base_names(root: Path) -> list[str]:
    """Modules of the project (library, wrapper layer, infra) that share a file or package name."""
    seen: dict[str, list[str]] = {}
    for top in (LIBRARY, *WRAPPER_PACKAGES, "infra"):
        for p in sorted((root / top).rglob("*.py")):
            rel = p.relative_to(root).as_posix()
            base = p.parent.name if p.name == "__init__.py" else p.stem
            if p.name == "__init__.py" and p.parent == root / top:
                continue  # the top packages themselves
            seen.setdefault(base, []).append(rel)
    return [f"{base}: {', '.join(where)}" for base, where in sorted(seen.items()) if len(where) > 1]


def library_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / LIBRARY).rglob("*.py"))


def violations(root: Path) -> list[str]:
    """Each broken rule as one line `file:line: what`; empty when the house keeps its rules."""
    out: dict[tuple[str, int, str], str] = {}  # one line per import statement and rule
    files = library_files(root)
    for rel in files:
        for imp in imports_of(root, rel):
            top = imp.module.split(".")[0]
            where = f"{rel}:{imp.line}"
            if top == "prefect":
                out.setdefault((rel, imp.line, "prefect"), f"{where}: the library imports {imp.module}")
            if top in WRAPPER_PACKAGES and (rel, imp.function) not in WRAPPER_DOORS:
                out.setdefault(
                    (rel, imp.line, "wrapper"),
                    f"{where}: the library imports the wrapper layer ({imp.module})",
                )
            here, there = room_of(module_name(rel)), room_of(imp.module)
            if here and there and here != there:
                if there not in LAYER_OF or here not in LAYER_OF:
                    out.setdefault((rel, imp.line, "room"), f"{where}: {imp.module} is in no room of LAYERS")
                elif LAYER_OF[there] >= LAYER_OF[here]:
                    what = "a room of the same layer" if LAYER_OF[there] == LAYER_OF[here] else "upward"
                    out.setdefault((rel, imp.line, "layer"), f"{where}: {here} imports {imp.module} ({what})")
    return [*out.values(), *(f"import circle: {' -> '.join(c)}" for c in circles(root, files))]


def circles(root: Path, files: list[str]) -> list[list[str]]:
    """Import circles between library modules (a package's __init__ is not a circle with its own
    submodules when only they import it)."""
    modules = {module_name(rel): rel for rel in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, rel in modules.items():
        for imp in imports_of(root, rel):
            if imp.module in modules and imp.module != mod:
                graph[mod].add(imp.module)
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            walk(mod, [mod])
    return found


def test_the_library_keeps_its_import_rules() -> None:
    assert violations(ROOT) == []


def test_no_two_modules_share_a_base_name() -> None:
    assert same_base_names(ROOT) == []


def test_the_rules_see_a_planted_violation(tmp_path: Path) -> None:
    """The checker is not vacuous: each rule catches a file that breaks it."""
    pkg = tmp_path / LIBRARY
    for room in ("stages", "evaluation", "runtime", "corpora", "models"):
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "eval.py").write_text("from cyclej.evaluation import metrics\n")
    (pkg / "evaluation" / "metrics.py").write_text("def f():\n    from cyclej.stages.eval import x\n")
    (pkg / "runtime" / "store.py").write_text("import prefect\n")
    (pkg / "corpora" / "formats.py").write_text("from cyclej.models import loading\n")
    (pkg / "models" / "loading.py").write_text("")
    (pkg / "cli.py").write_text("def run():\n    from flows.launch import launch\n")
    found = violations(tmp_path)
    assert any("evaluation imports cyclej.stages.eval (upward)" in v for v in found)
    assert any(
        "corpora/formats.py:1: corpora imports cyclej.models (a room of the same layer)" in v for v in found
    )
    assert any("cyclej/runtime/store.py:1: the library imports prefect" in v for v in found)
    assert any("wrapper layer (flows.launch)" in v for v in found)
    assert any(v.startswith("import circle:") and "cyclej.evaluation.metrics" in v for v in found)
    (pkg / "merge.py").write_text("")
    (pkg / "stages" / "merge.py").write_text("")
    assert same_base_names(tmp_path) == ["merge: cyclej/merge.py, cyclej/stages/merge.py"]


def test_importing_the_library_loads_no_prefect() -> None:
    """What the rules promise, at run time: the CLI and every stage import without Prefect."""
    code = (
        "import sys, pkgutil, importlib, cyclej, cyclej.cli, cyclej.pipeline.registry\n"
        "for m in pkgutil.walk_packages(cyclej.__path__, 'cyclej.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'flows', 'tasks'))\n"
        "print(bad[:5])\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
