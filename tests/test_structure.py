"""The code's shape, checked: no import cycle, no function over 80 lines, no block of six or
more lines written twice inside qconvert/, method files under 300 lines."""

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qconvert", "qconvert_kernels")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the qconvert modules it imports anywhere (function-level imports included);
    an import of a package's own ancestors (``from qconvert import __version__``) is not an edge."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        package = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and not m.startswith(t + "."):
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_over_80_lines():
    long = []
    for path in sorted((ROOT / "qconvert").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []


def test_method_files_under_300_lines():
    big = [p.name for p in (ROOT / "qconvert" / "methods").glob("*.py") if len(p.read_text().splitlines()) >= 300]
    assert big == []


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text with white space folded) of the lines that carry code: no blank,
    comment-only, docstring-free filtering beyond that, no import lines, no lone brackets."""
    out = []
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        line = " ".join(raw.split())
        if not line or line.startswith("#") or line.startswith(("import ", "from ")) or re.fullmatch(r"[\])}:,]+", line):
            continue
        out.append((i, line))
    return out


def repeated_blocks(paths, size: int = 6) -> list[str]:
    """Runs of ``size`` identical code lines found in two places."""
    seen = defaultdict(list)
    for path in paths:
        lines = _code_lines(path)
        for j in range(len(lines) - size + 1):
            key = tuple(text for _, text in lines[j: j + size])
            seen[key].append(f"{path.relative_to(ROOT)}:{lines[j][0]}")
    return sorted(" ~ ".join(places) for key, places in seen.items() if len(places) > 1)


def test_no_block_of_six_lines_written_twice():
    assert repeated_blocks(sorted((ROOT / "qconvert").rglob("*.py"))) == []


def test_the_repeat_finder_finds_one(tmp_path):
    body = "\n".join(f"x{i} = f({i})" for i in range(6))
    (tmp_path / "a.py").write_text(body + "\n")
    (tmp_path / "b.py").write_text("y = 1\n" + body + "\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert len(repeated_blocks([tmp_path / "a.py", tmp_path / "b.py"])) == 1
    finally:
        ROOT = old


def test_an_installed_wheel_carries_every_package_and_kernel_source():
    """pyproject.toml lists its packages by hand: every package folder of qconvert/ and
    qconvert_kernels/ must be among them, and every .cu / .cuh / .toml file a package needs must
    match its package-data, or a non-editable install (pip install qconvert, a wheel) lacks it
    and a GPU load fails on an import or a missing kernel source."""
    import fnmatch
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared, data, dirs = set(setup["packages"]), setup["package-data"], setup.get("package-dir", {})
    folders = {str(p.parent.relative_to(ROOT)).replace("/", "."): p.parent
               for top in ("qconvert", "qconvert_kernels") for p in (ROOT / top).rglob("__init__.py")}
    missing = sorted(set(folders) - declared)
    assert not missing, f"packages missing from pyproject.toml [tool.setuptools] packages: {missing}"
    folders.update({name: ROOT / path for name, path in dirs.items()})
    unshipped = [str(f.relative_to(ROOT)) for name, folder in folders.items()
                 for f in folder.iterdir() if f.suffix in (".cu", ".cuh", ".toml")
                 and not any(fnmatch.fnmatch(f.name, pat) for pat in data.get(name, ()))]
    assert not unshipped, f"files no package-data pattern ships: {unshipped}"
