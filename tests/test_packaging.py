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
import time
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


# --- the wheel ------------------------------------------------------------------------------------


def docker_context(dest: Path) -> Path:
    """A copy of what Dockerfile.dockerignore (an allowlist) lets into the image's build context."""
    lines = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    assert lines[0] == "*", "Dockerfile.dockerignore is expected to be an allowlist"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    excluded = [line.removeprefix("**/") for line in lines[1:] if not line.startswith("!")]
    ignore = shutil.ignore_patterns(*excluded)
    for name in allowed:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / name)
    return dest


def setuptools_satisfies_build_system() -> bool:
    """Whether this venv's setuptools meets pyproject's build-system requirement (then no isolation)."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    (spec,) = [r for r in requires if r.startswith("setuptools")]
    minimum = re.fullmatch(r"setuptools>=([\d.]+)", spec.replace(" ", ""))
    try:
        installed = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return False
    as_tuple = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:3])  # noqa: E731
    return minimum is not None and as_tuple(installed) >= as_tuple(minimum.group(1))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel --no-deps .` builds from the image's build context, as deploy/Dockerfile does."""
    context = docker_context(tmp_path_factory.mktemp("context"))
    out_dir = tmp_path_factory.mktemp("wheels")
    # this venv's setuptools when it is recent enough (fast, offline); else pip's isolated build
    isolation = ["--no-build-isolation"] if setuptools_satisfies_build_system() else []
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out_dir), *isolation, "."]
    out = subprocess.run(cmd, cwd=context, env=clean_env(), check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (whl,) = out_dir.glob("meterline-*.whl")
    return whl


def test_the_wheel_holds_the_packages_and_the_dashboard_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("sidecar", "ledger", "exporters"):
        assert f"{package}/__init__.py" in names, package
        sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py")}
        assert sources <= names, f"{package}: missing {sorted(sources - names)[:5]}"
    web = {p.relative_to(ROOT).as_posix() for p in WEB.rglob("*") if p.is_file()}
    assert {"dashboards/web/index.html", "dashboards/web/vendor/uPlot.iife.min.js"} <= web
    assert web <= names, f"dashboard files missing from the wheel: {sorted(web - names)}"
    assert not any(fnmatch(n, "*.duckdb*") or "__pycache__" in n or n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "meterline = sidecar.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_wheel_serves_the_dashboard_from_any_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, env=clean_env(), timeout=120)
    vpy = venv / "bin" / "python"
    site = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, env=clean_env()).stdout.strip())
    # Dependencies come from this test run's venv, after the new venv's own site-packages: a plain path
    # line, so that venv's .pth files (its editable install of this repository) are not run.
    (site / "zz-meterline-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--quiet", "--no-deps",
                          str(wheel)], check=False, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([str(vpy), "-c", "import sidecar.dashboard as d; print(d.__file__); print(d.WEB_DIR)"],
                         cwd=elsewhere, check=False, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    module, web_dir = (Path(line) for line in out.stdout.split())
    assert module.is_relative_to(site) and web_dir.is_relative_to(site), out.stdout
    assert not web_dir.is_relative_to(ROOT) and (web_dir / "index.html").is_file()
    assert (web_dir / "vendor" / "uPlot.iife.min.js").read_bytes() == (WEB / "vendor" / "uPlot.iife.min.js").read_bytes()

    port = free_port()
    proc = subprocess.Popen([str(venv / "bin" / "meterline"), "serve", "--port", str(port), "--db",
                             str(tmp_path / "ledger.duckdb")], cwd=elsewhere, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}/_meterline/"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "healthz", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(f"meterline serve did not come up: {proc.communicate()[0]}")
                time.sleep(0.1)
        with urllib.request.urlopen(base, timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
        with urllib.request.urlopen(base + "static/vendor/uPlot.iife.min.js", timeout=10) as resp:
            assert resp.read() == (WEB / "vendor" / "uPlot.iife.min.js").read_bytes()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- CI on a fresh machine ------------------------------------------------------------------------


def test_ci_installs_every_debian_package_the_tests_drive_then_runs_make_test(tmp_path):
    """.ci/run on a machine that has only bash and python3: apt-get and make are stand-ins that record."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # make exists only once apt-get has installed it
    (tmp_path / "make").write_text(f'#!/bin/sh\necho "make $* (in $(pwd))" >> {log}\n')
    (tmp_path / "make").chmod(0o755)
    (bin_dir / "apt-get").write_text(f'#!/bin/bash\necho "apt-get $* (in $(pwd))" >> {log}\n'
                                     f'[[ " $* " == *" make "* ]] && cp {tmp_path / "make"} {bin_dir}/make\nexit 0\n')
    (bin_dir / "apt-get").chmod(0o755)
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")
    (bin_dir / "id").chmod(0o755)
    for tool in ("bash", "dirname", "sh", "cp"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    out = subprocess.run(["bash", str(repo / ".ci" / "run")], env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = log.read_text().splitlines()
    (install,) = [c for c in calls if c.startswith("apt-get install")]
    packages = set(install.split(" (in ")[0].split()[2:])
    assert {"make", "prometheus", "chromium", "openssl", "systemd"} <= packages, install
    assert calls[-1] == f"make test (in {repo})", calls
