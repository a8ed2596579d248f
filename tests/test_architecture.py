"""The layout rules of docs/architecture.md, checked on the source (imports read with ``ast``, nothing run).

- rooms import only downward: runtime ← calibrate ← planner ← the cachec front end (``cachec/``) ← bench;
  the only upward imports allowed are the front end's entry points named in ``ALLOWED_UP``;
- ``planner/`` imports no torch, ``runtime/`` no scipy (at any depth of the module, lazily or not);
- no import cycles between modules of the package;
- no source file over 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: package room -> folder
ROOMS = {"runtime": "runtime", "calibrate": "calibrate", "planner": "planner", "cachec": "cachec"}
#: a room may import the rooms below it (its index is higher)
ORDER = ["cachec", "planner", "calibrate", "runtime"]
#: upward imports that are an entry point's job (module -> rooms it may import although they are above it)
ALLOWED_UP = {
    "calibrate/__main__.py": {"cachec"},  # the torchrun entry loads the model through the front end
}
MAX_LINES = 600


def _sources():
    for room, folder in ROOMS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            yield room, path
    for path in sorted((ROOT / "bench").rglob("*.py")):
        yield "bench", path
    for path in sorted((ROOT / "scripts").glob("*.py")):
        yield "scripts", path


def _module(room: str, path: Path) -> str:
    if room == "cachec":
        return "cachec" if path.stem == "__init__" else f"cachec.{path.stem}"
    base = f"cachec.{room}"
    return base if path.stem == "__init__" else f"{base}.{path.stem}"


def _imports(room: str, path: Path) -> list[str]:
    """Absolute names of every module imported anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mod = _module(room, path)
    package = mod if path.stem == "__init__" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.append(name)
            out += [f"{name}.{a.name}" for a in node.names]  # `from pkg import module`
    return out


def _room_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "cachec":
        return None
    if len(parts) > 1 and parts[1] in ("runtime", "calibrate", "planner", "plans"):
        return parts[1]
    return "cachec"


def test_rooms_import_only_downward():
    bad = []
    for room, path in _sources():
        if room not in ORDER:
            continue
        rel = str(path.relative_to(ROOT))
        for name in _imports(room, path):
            other = _room_of(name)
            if other is None or other == room or other == "plans" or name == "cachec.__version__" or name == "cachec":
                continue
            if ORDER.index(other) < ORDER.index(room) and other not in ALLOWED_UP.get(rel, set()):
                bad.append(f"{rel} imports {name} ({other} is above {room})")
    assert not bad, "\n".join(bad)


def test_planner_has_no_torch_and_runtime_no_scipy():
    bad = []
    for room, path in _sources():
        banned = {"planner": "torch", "runtime": "scipy"}.get(room)
        if banned is None:
            continue
        for name in _imports(room, path):
            if name == banned or name.startswith(banned + "."):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules = {_module(r, p): (r, p) for r, p in _sources() if r in ROOMS}
    graph = {m: sorted({n for n in _imports(r, p) if n in modules and n != m}) for m, (r, p) in modules.items()}
    # a package's __init__ that re-exports its submodules lazily does not import them; eager re-exports
    # make `pkg -> pkg.sub`, and `pkg.sub -> pkg` (importing the package's own __init__) is then a cycle
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_no_source_file_over_600_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for _, p in _sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, "\n".join(long)
