"""Sphinx extension: fail the build when a public name is missing from the API reference.

``api_coverage_module`` names a module; every name in its ``__all__`` must be documented by an autodoc directive
(``autofunction``, ``autoclass``, ...) as ``<module>.<name>``. A name that is not raises an error at the end of
reading, with or without ``-W``, so a new public name cannot ship undocumented.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import ExtensionError


def missing_names(module: str, public: Iterable[str], documented: Iterable[str]) -> list[str]:
    """The names of ``public`` not documented as ``module.name``, in ``public``'s order."""
    documented = set(documented)
    return [name for name in public if f"{module}.{name}" not in documented]


def _check(app: Sphinx, env: BuildEnvironment) -> None:
    module = app.config.api_coverage_module
    if not module:
        return
    public = importlib.import_module(module).__all__
    documented = env.get_domain("py").objects  # full name -> where it is documented
    missing = missing_names(module, public, documented)
    if missing:
        raise ExtensionError(
            f"{len(missing)} public name(s) of {module} missing from the API reference: {', '.join(missing)}. "
            "Add each to docs/api.rst (a table row and an autodoc entry)."
        )


def setup(app: Sphinx) -> dict[str, object]:
    app.add_config_value("api_coverage_module", "", "env")
    app.connect("env-check-consistency", _check)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
