"""Installs and describes the peer gateways (LiteLLM proxy, Portkey gateway) in bench/.envs/, never in the project."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ENVS = Path(__file__).resolve().parent / ".envs"

# Pinned: a benchmark must be repeatable, and a pin keeps a pulled or compromised release out
# (1.107.0 was pulled as compromised; 1.110.x's [proxy] extra needs a `litellm-proxy` package
# that the index does not serve, 1.106.12's does not).
LITELLM_SPEC = "litellm[proxy]==1.106.12"
PORTKEY_SPEC = "@portkey-ai/gateway@1.15.2"
# With the @hono/node-server 1.19.x that npm picks for it, every streamed Portkey call fails with
# "TypeError: immutable" (rebuilding a Response from a fetch() Response keeps its immutable
# headers; fixed in @hono/node-server 2.x, honojs/node-server#382), so the bench env overrides it.
PORTKEY_OVERRIDES = {"@hono/node-server": "2.1.9"}
MATPLOTLIB_SPEC = "matplotlib==3.11.2"
INSTALL_TIMEOUT_S = 900


@dataclass
class Installed:
    """The outcome of one install: a usable path, or the reason there is none."""

    name: str
    ok: bool
    detail: str  # the executable or entry point when ok, else why not
    version: str = ""


def _run(cmd: list[str], log: Path, timeout: float = INSTALL_TIMEOUT_S, cwd: Path | None = None) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=timeout, cwd=cwd)


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _python_env(name: str, spec: str, probe: str) -> tuple[Path, Path]:
    """A venv under .envs/<name> holding `spec`; returns (python, log). Reused when its stamp matches."""
    env = ENVS / name
    python = env / "bin" / "python"
    stamp = env / ".installed"
    log = ENVS / f"{name}.install.log"
    if stamp.exists() and stamp.read_text() == spec and python.exists():
        return python, log
    ENVS.mkdir(parents=True, exist_ok=True)
    if env.exists():
        shutil.rmtree(env)
    log.write_text("")
    _run([sys.executable, "-m", "venv", str(env)], log, timeout=120)
    _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", spec], log)
    _run([str(python), "-c", probe], log, timeout=120)
    stamp.write_text(spec)
    return python, log


def install_litellm() -> Installed:
    try:
        python, _ = _python_env("litellm", LITELLM_SPEC, "import litellm.proxy.proxy_server")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        return Installed("litellm", False, f"{type(e).__name__}: {_tail(ENVS / 'litellm.install.log')}")
    exe = python.parent / "litellm"
    if not exe.exists():
        return Installed("litellm", False, "the litellm command is missing after install")
    return Installed("litellm", True, str(exe), LITELLM_SPEC.split("==")[1])


def _portkey_stamp() -> str:
    return PORTKEY_SPEC + " " + json.dumps(PORTKEY_OVERRIDES, sort_keys=True)


def install_portkey() -> Installed:
    node = shutil.which("node")
    npm = shutil.which("npm")
    if not node or not npm:
        return Installed("portkey", False, "node or npm is not on PATH")
    env = ENVS / "portkey"
    stamp = env / ".installed"
    log = ENVS / "portkey.install.log"
    entry = env / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if not (stamp.exists() and stamp.read_text() == _portkey_stamp() and entry.exists()):
        try:
            if env.exists():
                shutil.rmtree(env)
            env.mkdir(parents=True)
            log.write_text("")
            (env / "package.json").write_text(json.dumps(
                {"name": "meterline-bench-portkey", "private": True, "overrides": PORTKEY_OVERRIDES}) + "\n")
            _run([npm, "install", "--no-audit", "--no-fund", "--omit=dev", PORTKEY_SPEC], log, cwd=env)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            return Installed("portkey", False, f"{type(e).__name__}: {_tail(log)}")
        if not entry.exists():
            return Installed("portkey", False, f"no {entry.relative_to(env)} in the installed package")
        stamp.write_text(_portkey_stamp())
    return Installed("portkey", True, str(entry), PORTKEY_SPEC.rsplit("@", 1)[1])


def install_matplotlib() -> Installed:
    try:
        python, _ = _python_env("plot", MATPLOTLIB_SPEC, "import matplotlib")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        return Installed("matplotlib", False, f"{type(e).__name__}: {_tail(ENVS / 'plot.install.log')}")
    return Installed("matplotlib", True, str(python), MATPLOTLIB_SPEC.split("==")[1])


if __name__ == "__main__":
    for fn in (install_litellm, install_portkey, install_matplotlib):
        print(fn(), flush=True)
    os._exit(0)
