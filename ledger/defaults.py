"""The ledger's file names and limits, importable without DuckDB: the forwarder never loads it."""
from __future__ import annotations

from pathlib import Path

# DuckDB caches every block it writes until its memory_limit (by default 80% of the machine's RAM),
# so a long-running ledger would grow the sidecar without bound; capped, old blocks are evicted
DEFAULT_MEMORY_LIMIT = "128MB"
DEFAULT_THREADS = 1  # DuckDB's threads: a sidecar leaves the machine's cores to the app
MAX_ROWS = 10_000  # what the SQL endpoint returns unless asked for more
MAX_EXPORT_ROWS = 100_000  # the most it returns when asked (`max_rows`): the rows are held in memory


def journal_dir(db_path: str | Path) -> Path:
    """The journals' root: the forwarders' directories (w0, w1, ...) are in it."""
    return Path(f"{db_path}.journal")


def salt_path(db_path: str | Path) -> Path:
    return Path(f"{db_path}.salt")


def read_salt(db_path: str | Path) -> bytes:
    """The fingerprint salt a forwarder needs; the sinks process made it when it opened the ledger."""
    return bytes.fromhex(salt_path(db_path).read_text().strip())


def is_lock_error(e: BaseException) -> bool:
    """DuckDB's error when another process holds the ledger file."""
    return "Could not set lock" in str(e) or "Conflicting lock" in str(e)
