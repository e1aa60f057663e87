"""Shipped files come from one place (detserve.runtime.paths) and are found from a checkout and from an
installed wheel alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from detserve.runtime import paths
from tests.conftest import ROOT

#: What `detserve models` and `detserve serve` need beside the code, by their path in the checkout.
SHIPPED = ["deploy.yaml", "models/yolo-shapes.pt", "models/fasterrcnn-shapes.pth"]


def test_a_checkout_reads_its_shipped_files_in_place(monkeypatch):
    monkeypatch.delenv(paths.ROOT_ENV, raising=False)
    monkeypatch.delenv(paths.ARTIFACTS_ENV, raising=False)
    assert paths.checkout() == ROOT and paths.root() == ROOT
    assert paths.deploy_config() == ROOT / "deploy.yaml" and paths.models_dir() == ROOT / "models"
    assert paths.artifacts_dir() == ROOT / "artifacts"


def test_detserve_root_names_the_project_folder(monkeypatch, tmp_path):
    (tmp_path / "deploy.yaml").write_text("applications: []\n")
    monkeypatch.setenv(paths.ROOT_ENV, str(tmp_path))
    monkeypatch.delenv(paths.ARTIFACTS_ENV, raising=False)
    assert paths.deploy_config() == tmp_path / "deploy.yaml"  # the project's own config wins
    assert paths.artifacts_dir() == tmp_path / "artifacts" and paths.results_dir() == tmp_path / "bench-results"


def test_a_missing_shipped_file_says_where_it_looked_and_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(paths, "installed_data", lambda: None)
    with pytest.raises(FileNotFoundError) as error:
        paths.models_dir()
    assert str(tmp_path / "models") in str(error.value) and f"export {paths.ROOT_ENV}=" in str(error.value)


PACKAGES = ("detserve", "runtime", "training", "export", "adapters", "serve", "benchmarks")


def build_wheel(source: Path, out: Path, shipped: bool = True) -> Path:
    """`pip wheel` of a copy of the checkout (a build writes build/ where it runs); without the shipped files
    when ``shipped`` is False, as the Dataloop runner images build it."""
    for name in ("pyproject.toml", "README.md") + (("deploy.yaml",) if shipped else ()):
        shutil.copy2(ROOT / name, source / name)
    for folder in PACKAGES + (("models",) if shipped else ()):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    done = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(source)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    [built] = out.glob("detserve-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel"))


def test_the_wheel_ships_deploy_yaml_and_the_default_weights(wheel):
    with zipfile.ZipFile(wheel) as z:
        sizes = {info.filename: info.file_size for info in z.infolist()}
    data = f"{wheel.name.split('-py3')[0]}.data/data/share/detserve/"
    for name in SHIPPED:
        assert sizes.get(data + name) == (ROOT / name).stat().st_size, name


def test_an_installed_wheel_finds_its_shipped_files_outside_any_checkout(wheel, tmp_path):
    prefix, elsewhere = tmp_path / "prefix", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    # --ignore-installed: without it pip uninstalls the detserve this interpreter has (the editable checkout).
    subprocess.run([*pip, "install", "--ignore-installed", "--no-deps", "--no-index", "-q", "--prefix", str(prefix), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    [site] = prefix.glob("lib/python*/site-packages")
    code = ("from detserve.runtime import paths, defaults; "
            "print(paths.checkout(), paths.deploy_config(), defaults.DEFAULT_MODELS['yolo'].weights, paths.artifacts_dir(), sep='\\n')")
    env = {k: v for k, v in os.environ.items() if k not in (paths.ROOT_ENV, paths.ARTIFACTS_ENV)}
    env["PYTHONPATH"] = str(site)  # ahead of the editable install, whose finder Python consults last
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, check=True, capture_output=True, text=True, timeout=120)
    checkout, config, weights, artifacts = out.stdout.split()
    assert checkout == "None"
    assert Path(config) == (prefix / "share/detserve/deploy.yaml").resolve()
    assert Path(weights) == (prefix / "share/detserve/models/yolo-shapes.pt").resolve() and Path(weights).is_file()
    assert Path(artifacts) == elsewhere.resolve() / "artifacts"  # written where it runs, not into the install


def test_a_build_without_the_shipped_files_still_makes_a_wheel(tmp_path):
    """The Dataloop runner images copy only the packages: their build must not need models/ or deploy.yaml."""
    (tmp_path / "source").mkdir()
    (tmp_path / "out").mkdir()
    built = build_wheel(tmp_path / "source", tmp_path / "out", shipped=False)
    with zipfile.ZipFile(built) as z:
        names = z.namelist()
    assert "detserve/runtime/paths.py" in names and not [n for n in names if ".data/" in n]
