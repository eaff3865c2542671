"""The package as a whole: its public names, and how its modules import one another."""

import ast
import subprocess
import sys
from pathlib import Path

import cnneb_jax

PACKAGE = Path(cnneb_jax.__file__).parent


def test_every_public_name_resolves():
    for name in cnneb_jax.__all__:
        assert callable(getattr(cnneb_jax, name)), name
    assert "load" in dir(cnneb_jax)


def _imports(path: Path) -> set[str]:
    """The cnneb_jax modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnneb_jax"):
            if node.module == "cnneb_jax":
                found |= {f"cnneb_jax.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cnneb_jax.")}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"cnneb_jax.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules |= {f"cnneb_jax.cli.{p.stem}": p for p in (PACKAGE / "cli").glob("*.py")}
    return {m: _imports(p) & set(modules) for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1 = on the path, 2 = done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n, path + [n])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_no_module_imports_itself_through_others():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _loaded_after(statement: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{statement}\nimport sys\n"
                          "print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout.split()
    return set(out)


def test_importing_the_model_or_serving_loads_no_data_source():
    """Nothing is imported for its side effects: the model and the exported-cascade runner
    need neither TensorFlow nor the data modules."""
    for module in ("cnneb_jax.model", "cnneb_jax.serving", "cnneb_jax.controller"):
        loaded = _loaded_after(f"import {module}")
        assert "tensorflow" not in loaded and "cnneb_jax.data" not in loaded, module
    serving = _loaded_after("import cnneb_jax.serving")
    assert {m for m in serving if m.startswith("cnneb_jax.")} == {"cnneb_jax.serving",
                                                                  "cnneb_jax.routing"}
