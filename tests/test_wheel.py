"""The wheel that ``pip install multihead`` gets: built here, offline, and opened.

It holds the package (every module under src/multihead, and py.typed for type checkers), the
license in its dist-info and the project's metadata, and nothing else: no tests, no benchmark
results, no pictures. The build runs on a copy of the repository, so it leaves no build/ or
egg-info behind and no stale build/ can leak into it; ``--no-build-isolation`` uses the
setuptools of this environment (the ``dev`` extra), so nothing is downloaded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "multihead"
SKIP = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    setuptools = metadata.version("setuptools")
    assert int(setuptools.split(".")[0]) >= 77, (
        f"setuptools {setuptools}: the build needs >= 77 (install the `dev` extra)"
    )
    tmp = tmp_path_factory.mktemp("wheel")
    source, out = tmp / "source", tmp / "dist"
    shutil.copytree(ROOT, source, ignore=SKIP)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "--quiet", "--wheel-dir", str(out), str(source)]
    subprocess.run(command, check=True, timeout=300)
    (built,) = out.glob("*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def _version() -> str:
    from multihead import __version__

    return __version__


def test_wheel_name(wheel):
    assert Path(wheel.filename).name == f"multihead-{_version()}-py3-none-any.whl"


def test_wheel_holds_the_package_and_nothing_else(wheel):
    names = [n for n in wheel.namelist() if not n.endswith("/")]
    dist_info = f"multihead-{_version()}.dist-info"
    assert {n.split("/")[0] for n in names} == {"multihead", dist_info}
    modules = {
        p.relative_to(PACKAGE.parent).as_posix()
        for p in PACKAGE.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    package = {n for n in names if n.startswith("multihead/")}
    assert package == modules | {"multihead/py.typed"}
    # No tests, no benchmark results or pictures, wherever they might hide.
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/")) or "/tests/" in n]
    assert not [n for n in names if n.endswith((".png", ".csv", ".json", ".md", ".pyc"))]


def test_wheel_carries_license_and_metadata(wheel):
    dist_info = f"multihead-{_version()}.dist-info"
    license_text = wheel.read(f"{dist_info}/licenses/LICENSE").decode()
    assert license_text == (ROOT / "LICENSE").read_text("utf8")
    assert "MIT License" in license_text
    meta = wheel.read(f"{dist_info}/METADATA").decode()
    headers = meta.split("\n\n", 1)[0].splitlines()
    for line in (
        "Name: multihead",
        "License-Expression: MIT",
        "License-File: LICENSE",
        "Requires-Dist: torch>=2.4",
        "Description-Content-Type: text/markdown",
        "Project-URL: Repository, https://github.com/multihead-dev/multihead",
        "Project-URL: Issues, https://github.com/multihead-dev/multihead/issues",
    ):
        assert line in headers, line
    for extra in ("models", "plot", "bench", "test", "dev"):
        assert f"Provides-Extra: {extra}" in headers, extra
    # The long description is the README, whose links are absolute (tests/test_readme.py).
    assert meta.split("\n\n", 1)[1].strip() == (ROOT / "README.md").read_text("utf8").strip()
    entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert "multihead = multihead.__main__:main" in entry_points
