"""No import cycle among the modules of llmx/ and pallas_kernels/: every import statement counts,
at module level or inside a function (a function-level import must not hide a cycle), except those
under `if TYPE_CHECKING:`, which never run."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("llmx", "pallas_kernels")


def module_names(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """{'llmx.data.pipeline': path, 'llmx.data': path/__init__.py, ...} under `root`."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name imported from a package is an edge to the
    submodule when one of that name exists, else to the package)."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from . import x / from .a import b
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import llmx.data.pipeline` -> that module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    path: list[str] = []

    def visit(node):
        colour[node] = GREY
        path.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return path[path.index(nxt):] + [nxt]
            if colour[nxt] == WHITE and (cycle := visit(nxt)):
                return cycle
        path.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE and (cycle := visit(node)):
            return cycle
    return None


def test_the_project_has_no_import_cycle():
    modules = module_names(REPO)
    assert "llmx.train" in modules and "pallas_kernels.adamw" in modules
    graph = import_graph(modules)
    assert "llmx.loop" in graph["llmx.train"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    package = tmp_path / "llmx"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from llmx.sub import b\n")
    (package / "a.py").write_text("from llmx.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from llmx import a\n    return a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llmx import a\n")
    graph = import_graph(module_names(tmp_path, packages=("llmx",)))
    assert graph["llmx.c"] == set()  # annotations only: never imported at run time
    assert find_cycle(graph) == ["llmx.a", "llmx.sub.b", "llmx.a"]


def test_every_script_and_notebook_helper_parses_on_the_oldest_supported_python():
    """Scripts are not imported by the suite, so a syntax error there (an f-string that nests its own
    quotes, legal only from Python 3.12) would otherwise reach users first. `ast.parse` with
    feature_version refuses newer syntax even on a newer interpreter."""
    bad = []
    for path in sorted([*(REPO / "scripts").rglob("*.py"), *(REPO / "notebooks").rglob("*.py")]):
        try:
            ast.parse(path.read_text(), filename=str(path), feature_version=(3, 11))
        except SyntaxError as e:
            bad.append(f"{path.relative_to(REPO)}:{e.lineno}: {e.msg}")
    assert not bad, bad


# Optional extras (and what tensorboardX would pull in with them) that the trainer, the evaluator and
# the sampler must not import: each costs start-up time on every run (torch alone ~1.2 s).
EXTRAS = ("torch", "transformers", "optuna", "ray", "wandb", "lm_eval", "gcsfs", "boto3", "google.cloud.storage")


def test_the_entry_points_import_no_optional_extra():
    def installed(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            return False

    present = [name for name in EXTRAS if installed(name)]
    if not present:
        pytest.skip("no optional extra is installed here, so none could be imported")
    code = ("import sys, llmx.train, llmx.evaluate, llmx.generate\n"
            f"print(' '.join(m for m in {present!r} if m in sys.modules))\n")
    if "torch" in present:  # still importable afterwards
        code += "import torch; assert float(torch.ones(1)) == 1.0\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "", f"imported at start-up: {out.stdout.strip()}"
