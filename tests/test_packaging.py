"""Packaging: the wheel installs into a fresh virtual environment and imports from there; metadata is complete.

The wheel test builds from a copy of the files a wheel is made of (so nothing is written into the checkout), without
build isolation (offline and in seconds: the dev extra brings the setuptools it needs), installs it with
``--no-deps`` into a fresh ``venv`` created without pip, and makes the runtime dependencies importable there by a
``.pth`` file naming this environment's site-packages. A ``.pth`` entry is a plain path entry: the ``.pth`` files
inside it (among them the editable install of the checkout) are not run, so the only optclip the fresh environment
can import is the wheel's. Downloading jax and optax again into each fresh environment would take minutes and the
network; ``--system-site-packages`` would not help, as it exposes the base interpreter's packages, not these. About
15 seconds on 2 cores.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import optclip

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "optclip")


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (``"jax>=0.4.30"`` -> ``"jax"``)."""
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_distributions() -> set[str]:
    """The distributions that optclip/*.py import at module level or inside functions, standard library left out."""
    modules = set()
    for path in (ROOT / "optclip").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"optclip", "__future__"}
    providers = importlib.metadata.packages_distributions()
    return {_name(providers[module][0]) for module in third_party}


def test_runtime_dependencies_are_what_optclip_imports():
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert declared == _imported_distributions()


def test_version_has_one_source():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "optclip.__version__"}


def test_license_file_matches_the_declared_license():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in WHEEL_SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    dist = tmp_path / "dist"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist]
    subprocess.run([*map(str, command), str(source)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("optclip-*.whl")
    return wheel


PROBE = """
import json, importlib.metadata, pathlib, jax.numpy as jnp, optclip
tx = optclip.clip_by_global_norm(1.0)
updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init({"w": jnp.zeros(2)}))
print(json.dumps({
    "file": optclip.__file__,
    "version": optclip.__version__,
    "metadata_version": importlib.metadata.version("optclip"),
    "py_typed": (pathlib.Path(optclip.__file__).parent / "py.typed").is_file(),
    "update": [float(v) for v in updates["w"]],
}))
"""


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.skipif(
    _setuptools_major() < 77, reason="building the wheel offline needs setuptools>=77 here (pip install -e '.[dev]')"
)
def test_wheel_installs_and_imports_in_a_fresh_environment(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "optclip/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"optclip"}, names
    assert f"Version: {optclip.__version__}\n" in metadata
    requires = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")}
    runtime = {r for r in requires if "extra ==" not in r}
    assert {_name(r) for r in runtime} == {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert "License-Expression: Apache-2.0" in metadata

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True, timeout=300)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    fresh = subprocess.check_output([str(python), "-c", where], text=True).strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(fresh) / "runtime_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")

    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [str(python), "-I", "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    installed = Path(probe["file"]).resolve()
    assert installed.is_relative_to(Path(fresh).resolve()), f"optclip imported from {installed}, not the wheel"
    assert not installed.is_relative_to(ROOT.resolve())
    assert probe["py_typed"]
    assert probe["version"] == probe["metadata_version"] == optclip.__version__
    assert probe["update"] == pytest.approx([0.6, 0.8])
