"""The import rules of the design card: pages -> app -> core, db; core never imports db or streamlit; db never
imports core.models; pages run no SQL and no torch. Checked on the source, so a violation fails here, not in review.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _offending(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(_imports(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_core_is_a_library_without_streamlit_or_database():
    files = [p for p in _files("core") if p.name != "__main__.py"]  # the CLI shim hands over to services.cli
    assert _offending(files, ("streamlit", "db", "services", "app", "pages", "sqlalchemy")) == []


def test_db_never_imports_models_or_streamlit():
    assert _offending(_files("db"), ("core.models", "torch", "streamlit", "app", "services")) == []


def test_services_never_import_streamlit():
    assert _offending(_files("services"), ("streamlit", "app", "pages")) == []


@pytest.mark.parametrize("page", _files("pages"), ids=lambda p: p.name)
def test_pages_are_thin(page):
    assert _offending([page], ("torch", "sqlalchemy", "timm")) == []
    assert "__main__" not in page.read_text()


def test_only_app_resources_caches_resources():
    users = [
        p.relative_to(ROOT).as_posix() for p in _files("app") + _files("pages") if "cache_resource" in p.read_text()
    ]
    assert users == ["app/resources.py"]
