"""The project's layout as a newcomer meets it: the packages import each other without a cycle, no file
edits sys.path (the package is installed), the design documents it cites are its own (docs/), modules
stay short unless they say why, and the README stays one screen per task."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "biva_image", "biva_text")
LONG_MODULE = 500  # lines; above it a module's docstring says why


def project_files(*suffixes: str) -> list[Path]:
    """The files of the repository (tracked or not, never ignored ones such as .venv/)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in out if f.endswith(suffixes) and (ROOT / f).is_file()]


def package_modules() -> dict[str, Path]:
    return {f"{pkg}.{f.stem}": f for pkg in PACKAGES for f in sorted((ROOT / pkg).glob("*.py"))
            if f.stem != "__init__"}


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``module`` imports anywhere (at the top or inside a function), except under
    ``if TYPE_CHECKING:``, which never runs."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
            and getattr(block.test, "id", None) == "TYPE_CHECKING" for stmt in block.body for n in ast.walk(stmt)}
    package = module.split(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package if node.level else None
            target = node.module if not node.level else (f"{base}.{node.module}" if node.module else base)
            names = [target, *(f"{target}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known and n != module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_packages_import_each_other_without_a_cycle():
    modules = package_modules()
    graph = {m: imported_modules(m, p, set(modules)) for m, p in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_lazy_import_cycle(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text("from .a import f\n")
    known = {"p.a", "p.b"}
    graph = {"p.a": imported_modules("p.a", tmp_path / "a.py", known),
             "p.b": imported_modules("p.b", tmp_path / "b.py", known)}
    assert find_cycle(graph) is not None
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    graph["p.b"] = imported_modules("p.b", tmp_path / "b.py", known)
    assert find_cycle(graph) is None


def test_the_shared_core_imports_no_modality():
    for module, path in package_modules().items():
        if module.startswith("shared."):
            imported = imported_modules(module, path, set(package_modules()))
            assert not [m for m in imported if not m.startswith("shared.")], module


def test_no_file_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for p in project_files(".py")
                 if re.search(r"sys\.path\.(insert|append)\(", p.read_text())]
    assert offenders == []


def test_the_design_documents_cited_are_the_projects_own():
    old = re.compile(r"\b(DESIGN|CONTRACTS)\.md\b")
    offenders = [str(p.relative_to(ROOT)) for p in project_files(".py", ".md", ".toml")
                 if p.parts[len(ROOT.parts)] != "docs" and old.search(p.read_text())]
    assert offenders == []
    cited = {m for p in project_files(".py") for m in re.findall(r"docs/(\w+)\.md", p.read_text())}
    assert cited and all((ROOT / "docs" / f"{name}.md").is_file() for name in cited), cited


def test_long_modules_say_why_in_their_docstring():
    for path in [p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")] + list((ROOT / "scripts").glob("*.py")):
        lines = path.read_text().count("\n")
        if lines > LONG_MODULE:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert f"{LONG_MODULE} lines" in doc, f"{path.relative_to(ROOT)}: {lines} lines, no reason given"


def test_the_readme_is_at_most_250_lines_and_has_two_quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 250
    start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", start, re.S)
    assert len(blocks) == 2 and all(b.strip().count("\n") == 0 for b in blocks)
    assert "scripts/train_text.py --dataset austen" in blocks[0] and "pytest" in blocks[1]
