"""Where detserve finds the files it ships (``deploy.yaml``, the default weights in ``models/``) and where
it writes (``artifacts/``, ``.cache/``, ``bench-results/``). Every other module asks here.

A checkout and an installed wheel are laid out differently. In a checkout (``make serve``, an editable
install) the shipped files sit in the repository root, beside ``runtime/``. A wheel installs the code into
site-packages, where the folder above this file is the ``detserve`` package, not a project; it carries the
shipped files as data (pyproject's ``data-files``) under ``<prefix>/share/detserve/``.

The project folder, :func:`root`, is ``DETSERVE_ROOT`` when set, else the checkout this code runs from, else
the current directory. Relative model paths and the folders detserve writes are taken from it, and a
shipped file found there wins over the wheel's copy, so a project folder can hold its own ``deploy.yaml``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import metadata
from pathlib import Path

ROOT_ENV = "DETSERVE_ROOT"
ARTIFACTS_ENV = "DETSERVE_ARTIFACTS"
#: Where a wheel's data files land, relative to the install prefix (pyproject's ``data-files`` keys).
SHIPPED_DATA = Path("share") / "detserve"


def checkout() -> Path | None:
    """The repository root when this code runs from a checkout (an editable install), else None."""
    candidate = Path(__file__).resolve().parent.parent
    return candidate if (candidate / "pyproject.toml").is_file() and (candidate / "runtime").is_dir() else None


def root() -> Path:
    """The project folder: ``DETSERVE_ROOT``, else the checkout, else the current directory."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser().resolve()
    return checkout() or Path.cwd()


@lru_cache(maxsize=1)
def installed_data() -> Path | None:
    """``<prefix>/share/detserve`` of an installed wheel (found through its RECORD), else None."""
    try:
        files = metadata.distribution("detserve").files or ()
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "deploy.yaml" and Path(file).parent.parts[-2:] == SHIPPED_DATA.parts:
            return Path(file.locate()).resolve().parent
    return None


def shipped(relative: str) -> Path:
    """A file detserve ships (``deploy.yaml``, ``models/yolo-shapes.pt``): from the project folder, else the wheel's
    data. Raises FileNotFoundError saying where it looked and how to point detserve at it."""
    searched = [root() / relative]
    data = installed_data()
    if data is not None:
        searched.append(data / relative)
    for path in searched:
        if path.exists():
            return path
    places = " or ".join(str(p) for p in searched)
    raise FileNotFoundError(
        f"{relative} not found (looked in {places}). Run from a detserve checkout, install the wheel "
        f"(it ships {relative}), or set {ROOT_ENV} to a folder that holds it: `export {ROOT_ENV}=/path/to/detserve`"
    )


def deploy_config() -> Path:
    """The Serve config detserve ships: ``deploy.yaml``."""
    return shipped("deploy.yaml")


def models_dir() -> Path:
    """The folder of the default weights (``models/``)."""
    return shipped("models")


def artifacts_dir() -> Path:
    """Where exports of the default models go: ``DETSERVE_ARTIFACTS``, else ``<project>/artifacts``."""
    return Path(os.environ.get(ARTIFACTS_ENV) or root() / "artifacts")


def cache_dir() -> Path:
    """Scratch that can be rebuilt (benchmark exports, the PyTriton venv): ``<project>/.cache``."""
    return root() / ".cache"


def results_dir() -> Path:
    """Where benchmark and soak runs write their reports: ``<project>/bench-results``."""
    return root() / "bench-results"
