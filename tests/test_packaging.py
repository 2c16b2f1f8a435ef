"""Packaging held to what users run: the Makefile's two promises and the wheel the container installs.

The Makefile is run for real (make, venv, pip) on a small stand-in project beside a copy of it, so
installing stays seconds: `make serve` installs the project without its test extras, `make test`
adds them, and a failed install or a broken venv is repaired by the next make, no `make clean`.
The wheel is built from exactly the files Dockerfile.dockerignore lets into the image's build, and
installed into a fresh venv, where `meterline serve`, run from an unrelated directory, serves the
built-in dashboard from the installed files.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import urllib.request
import zipfile
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path

import pytest

from tests.sidecar_process import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
WEB = ROOT / "dashboards" / "web"

pytestmark = pytest.mark.timeout(600)

make_needed = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed (Debian package `make`)")


def clean_env() -> dict[str, str]:
    """The environment of a user's shell: no outer venv, make or Python path leaking in."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "PIP_REQUIRE_VIRTUALENV"}
    return {k: v for k, v in os.environ.items() if k not in drop}


# --- the Makefile ---------------------------------------------------------------------------------

STAND_IN = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "standin"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = [{deps}]

[project.optional-dependencies]
test = ["pytest==9.2.0"]

[project.scripts]
meterline = "standin:main"

[tool.setuptools]
py-modules = ["standin"]
'''


def make(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(project), f"PY={sys.executable}", *args], env=clean_env(),
                          check=False, capture_output=True, text=True, timeout=300)


def venv_has(project: Path, module: str) -> bool:
    out = subprocess.run([str(project / ".venv" / "bin" / "python"), "-c", f"import {module}"],
                         env=clean_env(), cwd=project, check=False, capture_output=True, timeout=60)
    return out.returncode == 0


@make_needed
def test_make_serve_installs_no_test_extras_and_make_recovers_from_a_failed_install_and_a_broken_venv(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "Makefile", project / "Makefile")
    (project / "pyproject.toml").write_text(STAND_IN.format(deps=""))
    (project / "standin.py").write_text("import sys\n\ndef main():\n    print('serving', *sys.argv[1:])\n")
    (project / "tests").mkdir()
    (project / "tests" / "test_it.py").write_text("def test_it():\n    assert True\n")

    # a fresh machine: `make serve` makes the venv and installs what serving needs, nothing more
    out = make(project, "serve", "ARGS=--port 9000")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "serving serve --port 9000" in out.stdout, out.stdout + out.stderr
    assert not venv_has(project, "pytest"), "make serve installed the test extras"
    # `make test` adds the test extras and runs the suite; serve afterwards installs nothing more
    out = make(project, "test")
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr
    out = make(project, "serve")
    assert out.returncode == 0 and "pip install" not in out.stdout, out.stdout + out.stderr

    # an install that fails is tried again by the next make, once its cause is gone
    (project / "pyproject.toml").write_text(STAND_IN.format(deps=f'"missing @ file://{tmp_path}/missing"'))
    out = make(project, "serve")
    assert out.returncode != 0 and "serving" not in out.stdout, out.stdout + out.stderr
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "pyproject.toml").write_text(
        '[project]\nname = "missing"\nversion = "1"\n[tool.setuptools]\npy-modules = ["missing"]\n')
    (tmp_path / "missing" / "missing.py").write_text("")
    out = make(project, "serve")
    assert out.returncode == 0 and "serving" in out.stdout, out.stdout + out.stderr
    assert venv_has(project, "missing")

    # a venv whose python runs but whose pip is gone (an interrupted venv or pip upgrade) is made again
    site = Path(subprocess.run([str(project / ".venv" / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, env=clean_env()).stdout.strip())
    shutil.rmtree(site / "pip")
    out = make(project, "serve")
    assert out.returncode == 0 and "serving" in out.stdout, out.stdout + out.stderr
    assert venv_has(project, "pip") and venv_has(project, "standin")
