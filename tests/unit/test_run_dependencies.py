"""Every package the service imports is a run dependency, not only a test extra.

`make run` installs pyproject's `dependencies` alone; a module that imports something only the
test extras bring (httpx once) dies on a fresh machine while the test suite stays green.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OWN_PACKAGES = {"serve_app", "deployments"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run_dependencies() -> set[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return {
        _normalized(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0])
        for spec in project["dependencies"]
    }


def _imported_modules() -> dict[str, str]:
    """Top-level third-party modules imported anywhere in the service -> a file importing it."""
    found: dict[str, str] = {}
    for package in sorted(OWN_PACKAGES):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN_PACKAGES:
                        found.setdefault(top, str(path.relative_to(REPO_ROOT)))
    return found


def test_every_imported_package_is_a_run_dependency() -> None:
    declared = _run_dependencies()
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, path in _imported_modules().items():
        names = {_normalized(d) for d in distributions.get(module, [module])}
        if not names & declared:
            missing[module] = (path, sorted(names))
    assert not missing, f"imported but not in [project] dependencies: {missing}"
