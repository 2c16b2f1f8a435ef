"""Fixtures of the end-to-end suite: a fake provider, the real sidecar in its own process, and SDK clients.

- `fake` (session): the fake OpenAI / Anthropic / Gemini server, in a thread of the test process.
- `sidecar` (module): `meterline serve` as a subprocess, on a loopback port, with a DuckDB ledger
  in a temporary directory of its own; every upstream points at the fake. A module changes the
  config by defining its own `sidecar_config` fixture (merged over the upstreams).
- `e2e` (module): the two together, plus what tests need to drive and check a call: a `Case`
  (one call's headers: scenario, a ledger tag and a header the fake records, to find both ends
  of the call), SDK clients aimed at the sidecar with `max_retries=0`, raw HTTP requests, and
  costs computed independently with genai-prices.
"""
from __future__ import annotations

import http.client
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

import anthropic
import genai_prices
import openai
import pytest
from google import genai
from google.genai import types as gtypes

from tests.fakes import Exchange, FakeProvider
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, Receiver
from tests.sidecar_process import Sidecar

pytest_plugins = ["tests.fleet_servers"]  # redis_server, redis_url, postgres_server, postgres_url

QUANTUM = Decimal("0.000000000001")  # the ledger's DECIMAL(38, 12)
CATALOG_SOURCE = f"genai-prices {genai_prices.__version__}"
CASE_HEADER = "x-e2e-case"  # forwarded to the fake, which records it: finds the call's exchange


def q(amount: Decimal) -> Decimal:
    return amount.quantize(QUANTUM)


@dataclass
class Case:
    """One call (or a few) under test: its headers find its ledger row and its fake exchange."""

    id: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"tags['case'] = '{self.id}'"


@dataclass
class Raw:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes  # as sent: not decompressed


@dataclass
class Expected:
    """A cost computed by the test itself with genai-prices, rounded as the ledger stores it."""

    input_usd: Decimal
    output_usd: Decimal

    @property
    def total_usd(self) -> Decimal:
        return self.input_usd + self.output_usd


class E2E:
    def __init__(self, fake: FakeProvider, sidecar: Sidecar) -> None:
        self.fake = fake
        self.sidecar = sidecar

    def on(self, sidecar: Sidecar) -> E2E:
        """The same helpers aimed at another sidecar process."""
        return E2E(self.fake, sidecar)

    # --- calls ---------------------------------------------------------------------------------

    def case(self, scenario: str | None = None, *, chunks: int | None = None, delay_ms: float | None = None,
             tags: str | None = None, **headers: str) -> Case:
        """Headers for one call: the fake's scenario, a `case` tag in the ledger, and the case header."""
        cid = uuid.uuid4().hex[:16]
        h = {CASE_HEADER: cid, "x-meterline-tags": f"case={cid}" + (f",{tags}" if tags else "")}
        if scenario:
            h["x-fake-scenario"] = scenario
        if chunks is not None:
            h["x-fake-chunks"] = str(chunks)
        if delay_ms is not None:
            h["x-fake-chunk-delay-ms"] = str(delay_ms)
        h.update({k.replace("_", "-"): v for k, v in headers.items()})
        return Case(cid, h)

    def openai(self, case: Case | None = None, api_key: str = "sk-e2e-openai", **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(api_key=api_key, base_url=f"{self.sidecar.url}/openai/v1", max_retries=0,
                             default_headers=case.headers if case else None, **kw)

    def anthropic(self, case: Case | None = None, api_key: str = "sk-ant-e2e", **kw: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(api_key=api_key, base_url=f"{self.sidecar.url}/anthropic", max_retries=0,
                                   default_headers=case.headers if case else None, **kw)

    def gemini(self, case: Case | None = None, api_key: str = "gm-e2e-key") -> genai.Client:
        options = gtypes.HttpOptions(base_url=f"{self.sidecar.url}/gemini", headers=case.headers if case else None,
                                     retry_options=gtypes.HttpRetryOptions(attempts=1))
        return genai.Client(api_key=api_key, http_options=options)

    def raw(self, path: str, body: Any = None, headers: dict[str, str] | None = None, method: str = "POST",
            case: Case | None = None, base: str | None = None) -> Raw:
        """One request through the sidecar (or `base`) with http.client: no retries, no decompression."""
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        h = {"Content-Type": "application/json", **(case.headers if case else {}), **(headers or {})}
        url = base or self.sidecar.url
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            return Raw(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    # --- what happened -------------------------------------------------------------------------

    def exchanges(self, case: Case, count: int = 1, timeout: float = 10.0) -> list[Exchange]:
        """The fake's finished exchanges of this case (waits for `count` of them)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.fake.exchanges if e.request_headers.get(CASE_HEADER) == case.id]
            if (len(found) >= count and all(e.done for e in found)) or time.monotonic() > deadline:
                return found
            time.sleep(0.01)

    def exchange(self, case: Case, timeout: float = 10.0) -> Exchange:
        found = self.exchanges(case, 1, timeout)
        assert len(found) == 1, f"expected one upstream exchange for case {case.id}, got {len(found)}"
        assert found[0].done, "the upstream exchange did not finish"
        return found[0]

    def rows(self, where: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Ledger rows (waiting for `count`), with `units` parsed from its JSON."""
        rows = self.sidecar.rows(where, count, timeout)
        for row in rows:
            if isinstance(row.get("units"), str):
                row["units"] = json.loads(row["units"])
        return rows

    def row(self, case: Case, timeout: float = 10.0) -> dict[str, Any]:
        rows = self.rows(case.where, 1, timeout)
        assert len(rows) == 1, f"expected one ledger row for case {case.id}, got {len(rows)}"
        return rows[0]

    def anomalies(self) -> dict[str, int]:
        return dict(self.sidecar.health()["anomalies"])

    # --- checks --------------------------------------------------------------------------------

    @staticmethod
    def expect(row: dict[str, Any], **fields: Any) -> None:
        """Every named column of the row has exactly the given value."""
        wrong = {k: (row.get(k), v) for k, v in fields.items() if row.get(k) != v}
        assert not wrong, "ledger row differs (column: (got, expected)): " + repr(wrong)

    @staticmethod
    def extract(doc: Any, provider_id: str, api_flavor: str = "default") -> genai_prices.Usage:
        """genai-prices' own reading of a provider response (or of an object holding its usage)."""
        return genai_prices.extract_usage(doc, provider_id=provider_id, api_flavor=api_flavor).usage

    @staticmethod
    def calc(usage: genai_prices.Usage, model: str, provider_id: str, started_at: str) -> Expected:
        at = datetime.fromisoformat(started_at)
        price = genai_prices.calc_price(usage, model, provider_id=provider_id, genai_request_timestamp=at)
        return Expected(q(price.input_price), q(price.output_price))

    def expect_cost(self, row: dict[str, Any], usage: genai_prices.Usage, model: str, provider_id: str) -> Expected:
        """The row's cost is genai-prices' price of `usage` at the row's start time, to the trillionth."""
        want = self.calc(usage, model, provider_id, row["started_at"])
        got = {k: row[k] for k in ("input_cost_usd", "output_cost_usd", "cost_usd")}
        assert all(isinstance(v, str) for v in got.values()), f"costs must come back as exact strings: {got}"
        assert (Decimal(got["input_cost_usd"]), Decimal(got["output_cost_usd"]), Decimal(got["cost_usd"])) == (
            want.input_usd, want.output_usd, want.total_usd), f"ledger {got} != genai-prices {want}"
        assert want.total_usd > 0, "a priced call in these tests costs something"
        assert row["price_source"] == CATALOG_SOURCE
        return want

    @staticmethod
    def expect_unpriced(row: dict[str, Any], source: str | None = "unpriced") -> None:
        assert (row["input_cost_usd"], row["output_cost_usd"], row["cost_usd"]) == (None, None, None)
        assert row["price_source"] == source


# --- fixtures ----------------------------------------------------------------------------------


def upstreams_for(fake: FakeProvider) -> dict[str, Any]:
    return {"upstreams": {name: {"base_url": fake.base_url} for name in ("openai", "anthropic", "gemini")}}


def launch(workdir: Path, config: dict[str, Any], attempts: int = 3) -> Sidecar:
    """Starts a sidecar and makes sure the process answering on its port is this one (the port is
    picked free, then bound by the subprocess: on a busy machine another process can take it first)."""
    for attempt in range(attempts):
        process = Sidecar(workdir, config)
        try:
            process.start()
        except RuntimeError:  # e.g. it exited: the port was taken
            if attempt == attempts - 1:
                raise
            continue
        if _is_ours(process):
            return process
        process.stop()
    raise RuntimeError(f"no sidecar of ours came up in {attempts} attempts:\n{process.log()}")


def _is_ours(process: Sidecar) -> bool:
    try:
        return (process.proc is not None and process.proc.poll() is None
                and process.health()["ledger"]["path"] == str(process.db))
    except Exception:  # noqa: BLE001 - whatever answers there, it is not our sidecar
        return False


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeProvider]:
    server = FakeProvider().start_in_thread()
    try:
        yield server
    finally:
        try:  # let calls cut off by a killed sidecar end on their own, rather than destroy their tasks
            server.wait_settled_sync(timeout=15)
        except TimeoutError:
            pass
        server.stop_thread()


@pytest.fixture(scope="module")
def sidecar_config() -> dict[str, Any]:
    """Config keys a module adds to the upstreams (override in the module)."""
    return {}


@pytest.fixture(scope="module")
def sidecar(fake: FakeProvider, sidecar_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Sidecar]:
    workdir: Path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    process = launch(workdir, {**upstreams_for(fake), **sidecar_config})
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def e2e(fake: FakeProvider, sidecar: Sidecar) -> E2E:
    return E2E(fake, sidecar)


@pytest.fixture
def start_sidecar(fake: FakeProvider, tmp_path: Path) -> Iterator[Callable[..., Sidecar]]:
    """Starts sidecars of the test's own (`workdir` again: the same ledger); all stop at teardown."""
    started: list[Sidecar] = []

    def start(extra: dict[str, Any] | None = None, workdir: Path | None = None) -> Sidecar:
        process = launch(workdir or tmp_path / f"sidecar{len(started)}", {**upstreams_for(fake), **(extra or {})})
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(params=["http", "grpc"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    """An in-process OTLP receiver, once over HTTP/protobuf and once over gRPC."""
    r: Receiver = HttpReceiver().start() if request.param == "http" else GrpcReceiver().start()
    r.protocol = "http/protobuf" if request.param == "http" else "grpc"  # type: ignore[attr-defined]
    yield r
    r.stop()  # type: ignore[attr-defined]
