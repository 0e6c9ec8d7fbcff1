"""The documentation site builds offline with warnings as errors, and its API reference covers ``optclip.__all__``.

The full build takes about 10 seconds on 2 cores (Sphinx imports optclip, and so JAX, for autodoc); it runs in a
subprocess so that Sphinx's own module state never leaks into the rest of the suite. Skipped, with the reason, only
where the ``docs`` extra is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import optclip

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOCS_PACKAGES = ("sphinx", "myst_parser", "sphinx_book_theme")

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in DOCS_PACKAGES),
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)


def _sphinx(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """``python -m sphinx -W --keep-going`` (the README's command) from ``source`` into ``out``, with no network.

    The proxies point at a closed local port, so an extension or theme that tried to download anything (an
    inventory, a font, a script) would fail the build here rather than pass on a machine that happens to be online.
    """
    offline = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    env = {**os.environ, **offline, **{k.upper(): v for k, v in offline.items()}}
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(source), str(out)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=out.parent, timeout=600)


@pytest.mark.slow
def test_site_builds_offline_without_warnings(tmp_path):
    result = _sphinx(DOCS, tmp_path / "html")
    assert result.returncode == 0, f"the docs build failed:\n{result.stdout}\n{result.stderr}"
    assert not result.stderr.strip(), f"the docs build printed warnings:\n{result.stderr}"
    api = (tmp_path / "html" / "api.html").read_text()
    for name in optclip.__all__:  # what the coverage check enforces, seen in the output too
        assert f'id="optclip.{name}"' in api, f"optclip.{name} has no entry in the built API reference"
    for page in ("index", "getting_started", "choosing", "migrating", "monitoring", "examples", "benchmarks"):
        assert (tmp_path / "html" / f"{page}.html").is_file(), f"{page}.html was not built"


def test_coverage_check_fails_the_build_on_an_undocumented_name(tmp_path):
    """A tiny project whose module exports two names and whose reference documents one: the build must fail."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "tinymod.py").write_text(
        '__all__ = ["documented", "forgotten"]\n\n\n'
        'def documented():\n    """In the reference."""\n\n\n'
        'def forgotten():\n    """Not in the reference."""\n'
    )
    (source / "conf.py").write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(source)!r}, {str(DOCS / '_ext')!r}]\n"
        'extensions = ["sphinx.ext.autodoc", "api_coverage"]\n'
        'api_coverage_module = "tinymod"\n'
    )
    (source / "index.rst").write_text("Tiny\n====\n\n.. autofunction:: tinymod.documented\n")
    result = _sphinx(source, tmp_path / "html")
    assert result.returncode != 0, "the build passed with tinymod.forgotten missing from the reference"
    assert "missing from the API reference: forgotten." in result.stderr, result.stderr


def test_missing_names_keeps_the_public_order():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from api_coverage import missing_names
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    documented = ["m.b", "m.other", "x.a"]
    assert missing_names("m", ["c", "a", "b"], documented) == ["c", "a"]
    assert missing_names("m", ["b"], documented) == []
