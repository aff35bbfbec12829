"""The package layout means something: imports follow the pipeline's layers, and no module imports
itself back through others.

Layers, each importing only those before it (``errors`` is importable everywhere):

    physics → io → render → model → analysis → reconstruct → simulate → commands, cli

``io`` needs ``physics`` (RELION angles to matrices, Fourier cropping); ``render`` needs only
``physics``; ``analysis`` (FSC, figures) sits under ``reconstruct``, which reports FSCs and writes
figures, and never imports it.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cryogs"

ALLOWED = {
    "errors": set(),
    "physics": {"errors"},
    "io": {"errors", "physics"},
    "render": {"errors", "physics"},
    "model": {"errors", "physics", "io", "render"},
    "analysis": {"errors", "physics", "io", "render"},
    "reconstruct": {"errors", "physics", "io", "render", "model", "analysis"},
    "simulate": {"errors", "physics", "io", "render", "model"},
    "commands": {"errors", "physics", "io", "render", "model", "analysis", "reconstruct", "simulate", "commands",
                 "cryogs"},
    "cli": {"errors", "cryogs"},  # the package itself only for __version__: its API is imported lazily
    "__main__": {"cli"},
    "__init__": set(),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every cryogs module the file ``path`` of the package imports, at module level or inside functions
    (``source`` replaces the file's text)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cryogs"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "cryogs":
                continue
            # "from package import module" names a module; "from module import name" does not
            subs = {f"{mod}.{a.name}" for a in node.names if is_module(f"{mod}.{a.name}")}
            found |= subs or {mod}
    return found


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").exists()


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cryogs"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    assert {layer(m) for m in MODULES} - {"cryogs"} <= set(ALLOWED), sorted({layer(m) for m in MODULES})


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers_only(module):
    own = layer(module)
    if own == "cryogs":  # the package's __init__: its public API is imported lazily, by name
        assert not imported_modules(MODULES[module]), "cryogs/__init__.py must import its API lazily"
        return
    upward = sorted(m for m in imported_modules(MODULES[module]) if layer(m) != own and layer(m) not in ALLOWED[own])
    assert not upward, f"{module} ({own}) imports {upward}"


def test_no_import_circles():
    graph = {m: {i for i in imported_modules(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import circle: " + " → ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_an_upward_import():
    """The rule can fail: a render module that imported the fitting code or the model would be reported."""
    path = PACKAGE / "render" / "project.py"
    found = imported_modules(path, "from cryogs.reconstruct.fit import run_training\nfrom ..model import gaussians\n")
    assert found == {"cryogs.reconstruct.fit", "cryogs.model.gaussians"}
    assert not {layer(m) for m in found} & ALLOWED["render"]
