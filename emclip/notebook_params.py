"""Refuse notebook parameters a notebook does not have (papermill injects whatever it is given, silently).

``papermill NB out -p foo 1`` defines ``foo`` and the notebook runs as if nothing happened; ``papermill NB out -f
params/ci.yaml`` injects the file's top-level keys (``name``, ``data``, ``train``, ...) and the notebook runs the
demo defaults. The first code cell after the parameters calls :func:`check_parameters` to refuse both, saying how
to do what was meant."""
from __future__ import annotations

import inspect

from .paramsets import SECTIONS
from .paths import project_root

# what IPython itself puts in a notebook's namespace
_IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})
# the sections of a parameter set (and the data: section older sets had), which `papermill -f` would inject
PARAMETER_SET_KEYS = frozenset(SECTIONS) | {"data"}


def declared_parameters(notebook: str) -> list[str]:
    """The names the notebook's ``parameters`` cell defines (papermill's own reading of it)."""
    import papermill
    return list(papermill.inspect_notebook(str(project_root() / "notebooks" / f"{notebook}.ipynb")))


def _is_value(obj) -> bool:
    return not (inspect.ismodule(obj) or inspect.isroutine(obj) or inspect.isclass(obj))


def check_parameters(namespace: dict, notebook: str) -> None:
    """Raise ``ValueError`` when ``namespace`` holds a value the notebook's parameters cell does not declare."""
    declared = set(declared_parameters(notebook))
    unknown = sorted(k for k, v in namespace.items()
                     if not k.startswith("_") and k not in _IPYTHON_NAMES and k not in declared and _is_value(v))
    if not unknown:
        return
    if set(unknown) & PARAMETER_SET_KEYS and set(unknown) <= PARAMETER_SET_KEYS:
        raise ValueError(f"{notebook} got the parameters {', '.join(unknown)}: these are the sections of a parameter "
                         f"set file, which papermill's -f injects as variables. Name the set instead: "
                         f"`-p params ci` (params/ci.yaml) or `-p params path/to/set.yaml`")
    raise ValueError(f"{notebook} has no parameter {', '.join(repr(u) for u in unknown)}; its parameters are: "
                     f"{', '.join(sorted(declared))}")
