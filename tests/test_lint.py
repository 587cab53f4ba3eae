"""Source checks: ruff, no unpickling, and the package's shape (import circles, class and function
size, hivemind's private names fenced in one module). ast only, no extra dependency."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "p2p_photon"
HIVEMIND_BACKEND = PACKAGE / "averaging" / "hivemind_backend.py"  # the one module allowed hivemind's internals
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 60

pytestmark = pytest.mark.timeout(120)


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (subpackages included)."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, names: set[str]) -> set[str]:
    """Package modules `name` imports (TYPE_CHECKING blocks and function-level imports included)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).rstrip(".") \
                if node.level else (node.module or "")
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base
                if target in names and target != name:
                    deps.add(target)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in names and a.name != name}
    return deps


def find_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


def test_find_circles_finds_a_circle():
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    mods = _modules()
    edges = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    assert edges["p2p_photon.peer.loop"], "the import scan found nothing: it is broken"
    assert find_circles(edges) == []


def _sizes(kind: type) -> list[tuple[int, str]]:
    out = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind):
                out.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(out, reverse=True)


def test_no_class_over_250_lines():
    assert [c for c in _sizes(ast.ClassDef) if c[0] > MAX_CLASS_LINES] == []


def test_no_function_over_60_lines():
    funcs = _sizes(ast.FunctionDef) + _sizes(ast.AsyncFunctionDef)
    assert len(funcs) > 100, "the scan found too few functions: it is broken"
    assert [f for f in funcs if f[0] > MAX_FUNCTION_LINES] == []


def _private_names(tree: ast.AST) -> set[str]:
    """Private (single-underscore) names a source defines: functions, methods, self._x/cls._x, globals."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
    return {n for n in out if n.startswith("_") and not n.startswith("__")}


def hivemind_private_uses(source: str, hivemind_private: set[str], ours: set[str]) -> list[str]:
    """Places where `source` reaches into hivemind: a private name imported from hivemind, or an
    attribute/method that hivemind defines privately (and our own code does not)."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hivemind"):
            hits += [f"line {node.lineno}: imports {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr in hivemind_private and node.attr not in ours:
            hits.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in hivemind_private \
                and node.name not in ours:
            hits.append(f"line {node.lineno}: overrides {node.name}")
    return hits


@pytest.fixture(scope="module")
def hivemind_private() -> set[str]:
    import hivemind

    names = set()
    for p in Path(hivemind.__file__).parent.rglob("*.py"):
        names |= _private_names(ast.parse(p.read_text()))
    assert {"_outer_pipe", "_matchmaking", "_aggregate_with_group"} <= names  # the scan sees hivemind's privates
    return names


def test_private_hivemind_names_only_in_the_backend(hivemind_private):
    mods = _modules()
    ours = set().union(*(_private_names(ast.parse(p.read_text())) for p in mods.values() if p != HIVEMIND_BACKEND))
    assert HIVEMIND_BACKEND.exists()
    assert hivemind_private_uses(HIVEMIND_BACKEND.read_text(), hivemind_private, ours), \
        "the backend uses no hivemind internals, or the scan is broken"
    offenders = {name: hits for name, path in mods.items() if path != HIVEMIND_BACKEND
                 and (hits := hivemind_private_uses(path.read_text(), hivemind_private, ours))}
    assert offenders == {}


def test_the_private_name_scan_catches_a_use():
    src = "from hivemind.utils import _helper\nclass A(X):\n    def _run_allreduce(self):\n        self._p2p.x()\n"
    hits = hivemind_private_uses(src, {"_p2p", "_run_allreduce"}, ours=set())
    assert hits == ["line 1: imports _helper", "line 3: overrides _run_allreduce", "line 4: ._p2p"]


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "p2p_photon", "tests", "scripts"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]


def test_nothing_is_unpickled():
    """No pickle of data from the network (or anywhere): checkpoints are safetensors + JSON, state
    downloads are raw tensor buffers + msgpack. A source scan that fails on any unpickling call."""
    pattern = re.compile(r"\bimport pickle\b|\bpickle\.loads?\(|\btorch\.load\(|\bnp\.load\(.*allow_pickle=True"
                         r"|\bcloudpickle\b|\bdill\b")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in _modules().values()
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def _override_problems(cls) -> list[str]:
    """Methods of `cls` that override a base method but drop one of its parameters (no **kwargs to take it)."""
    import inspect

    out = []
    for name, fn in vars(cls).items():
        if not inspect.isfunction(fn) or name.startswith("__"):
            continue
        base = next((vars(b)[name] for b in cls.__mro__[1:] if name in vars(b)), None)
        if not inspect.isfunction(base):
            continue
        mine, theirs = inspect.signature(fn).parameters, inspect.signature(base).parameters
        if any(p.kind is p.VAR_KEYWORD for p in mine.values()):
            continue
        positional = [p for p in mine.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        missing = [p for i, (p, q) in enumerate(theirs.items())  # by name, or by place (a renamed positional)
                   if p not in mine and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)
                   and not (q.kind is not q.KEYWORD_ONLY and i < len(positional))]
        out += [f"{cls.__module__}.{cls.__qualname__}.{name} lacks {', '.join(missing)}"] if missing else []
    return out


def test_overrides_accept_every_parameter_of_the_method_they_override():
    """Seen in the soak: PeerParts.sync_from_peers gained `min_round`, the override in Peer did not, and a
    peer whose group was late for a round died of a TypeError. Every class of the package is checked."""
    import importlib
    import inspect

    problems = []
    for name in _modules():
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == name:
                problems += _override_problems(cls)
    assert not problems, problems

    class Base:
        def f(self, a, b=0):
            return a

    class Bad(Base):
        def f(self, a):
            return a

    assert _override_problems(Bad) == [f"{__name__}.{Bad.__qualname__}.f lacks b"]
