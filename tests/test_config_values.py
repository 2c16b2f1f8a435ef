"""Config values that used to be accepted and then broke the sidecar (a NaN timeout, 100000 DuckDB
threads, an unknown timeout key, a port beyond 65535, a ledger path that is a directory or under a
file, amounts the ledger's DECIMAL(38, 12) cannot hold) stop `meterline serve --config` with exit
code 2 and one line naming the key, without a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sidecar_process import free_port

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "nan_timeout": ("timeouts:\n  read_s: .nan\n", "timeouts.read_s"),
    "infinite_timeout": ("timeouts:\n  connect_s: .inf\n", "timeouts.connect_s"),
    "unknown_timeout": ("timeouts:\n  read_s: 30\n  raed_s: 30\n", "timeouts.raed_s"),
    "threads": ("ledger:\n  threads: 100000\n", "ledger.threads"),
    "port": ("upstreams:\n  x:\n    base_url: http://x:99999\n", "upstreams.x.base_url"),
    "path_is_dir": ("ledger:\n  path: {tmp}\n", "ledger.path"),
    "path_under_file": ("ledger:\n  path: {tmp}/afile/ledger.duckdb\n", "ledger.path"),
    "price": ("prices:\n  - model: m\n    input_per_mtok: 1e300\n", "prices[0].input_per_mtok"),
    "limit": ("budgets:\n  - name: b\n    limit_usd: 1e300\n", "budgets[0].limit_usd"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_value_is_one_line_naming_its_key(case: str, tmp_path: Path) -> None:
    text, key = CASES[case]
    (tmp_path / "afile").write_text("not a directory")
    config = tmp_path / "meterline.yaml"
    config.write_text(text.replace("{tmp}", str(tmp_path)))
    try:
        done = subprocess.run([sys.executable, "-m", "sidecar.cli", "serve", "--config", str(config),
                               "--port", str(free_port())],
                              cwd=tmp_path, capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"meterline serve accepted {case} and kept running (or hung): {e.stderr}")
    assert done.returncode == 2, done.stderr
    assert key in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
