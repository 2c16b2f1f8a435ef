"""The ledger beside the provider's own reports: aggregates the `calls` table by the same buckets and
models, compares them metric by metric, attributes the drift, and stores each run (never touching `calls`)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson

from ledger import sql

from . import reconcile_store
from .admin_api import KIND_METRICS, Key, ProviderReport
from .reconcile_store import METRICS

COUNTS = tuple(m for m in METRICS if m != "usd")  # requests, tokens, images, seconds

# what each attributed cause means, for the report and the docs
CAUSES = {
    "unseen": "traffic the sidecar never saw (another client on the same key or project?)",
    "not_at_provider": "calls the provider does not report (its reports lag; or another key/org)",
    "mispriced": "tokens match but dollars do not: the price table drifted from the provider's",
    "unpriced": "the ledger has calls with no known price (NULL cost)",
    "missing_calls": "the provider counts more: calls the ledger missed",
    "extra_calls": "the ledger counts more: calls the provider did not bill",
}

# the ledger's calls by the usage report that counts them (OpenAI's speech has no operation of its
# own in the ledger: the adapter records it as `other`, so its endpoint names it)
_KIND = {
    "openai": """CASE WHEN operation IN ('chat', 'text_completion') THEN 'completions'
            WHEN operation = 'embeddings' THEN 'embeddings'
            WHEN operation = 'image_generation' THEN 'images'
            WHEN operation = 'transcription' THEN 'audio_transcriptions'
            WHEN operation = 'other' AND endpoint LIKE '%/audio/speech' THEN 'audio_speeches' END""",
    "anthropic": "CASE WHEN operation IN ('chat', 'text_completion') THEN 'messages' END",
}


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def ledger_query(provider: str, since: datetime, until: datetime, bucket: str, key_fingerprints: list[str]) -> str:
    """One read-only SELECT: the provider's billed calls per (bucket, model, kind), in its own terms.

    `input_tokens` counts cached tokens too: OpenAI's uncached input is input minus cache reads;
    Anthropic's is input minus cache reads and cache writes. Blocked calls never reached the provider.
    Images and audio seconds come from `units`; a group where some successful call did not record
    them (token-billed image or transcription models) has NULL there: not comparable.
    """
    unit = "hour" if bucket == "1h" else "day"
    uncached = "input_tokens - coalesce(cache_read_tokens, 0)"
    if provider == "anthropic":
        uncached += " - coalesce(cache_write_tokens, 0)"
    where = [f"provider = {_quote(provider)}", "outcome <> 'blocked'",
             f"started_at >= to_timestamp({int(since.timestamp())})",
             f"started_at < to_timestamp({int(until.timestamp())})"]
    if key_fingerprints:
        where.append(f"key_fingerprint IN ({', '.join(_quote(k) for k in key_fingerprints)})")
    reported = "(input_tokens IS NOT NULL OR output_tokens IS NOT NULL)"
    counted = f"(outcome = 'ok' OR {reported})"

    def unit_sum(name: str) -> str:
        return f"CASE WHEN count(*) FILTER (WHERE outcome = 'ok' AND {name} IS NULL) = 0 THEN coalesce(sum({name}), 0) END"

    return f"""
SELECT CAST(epoch(date_trunc('{unit}', started_at AT TIME ZONE 'UTC')) AS BIGINT) AS bucket,
       coalesce(response_model, request_model, '(no model)') AS model, kind,
       count(*) FILTER (WHERE {counted}) AS requests,
       coalesce(sum({uncached}), 0) AS uncached_input,
       coalesce(sum(cache_read_tokens), 0) AS cache_read,
       coalesce(sum(cache_write_tokens), 0) AS cache_write,
       coalesce(sum(output_tokens), 0) AS output,
       {unit_sum("images")} AS images,
       {unit_sum("seconds")} AS seconds,
       sum(cost_usd) AS usd,
       count(*) FILTER (WHERE cost_usd IS NULL AND {counted}) AS unpriced
FROM (SELECT *, {_KIND[provider]} AS kind,
             TRY_CAST(json_extract_string(units, '$.images') AS BIGINT) AS images,
             TRY_CAST(json_extract_string(units, '$.audio_seconds') AS {reconcile_store.SECONDS}) AS seconds
      FROM calls WHERE {' AND '.join(where)})
WHERE kind IS NOT NULL
GROUP BY ALL ORDER BY 1, 2, 3"""


@dataclass(slots=True)
class LedgerSide:
    usage: dict[Key, dict[str, Any]] = field(default_factory=dict)  # the kind's metrics + usd + unpriced


def ledger_side(result: sql.Result) -> LedgerSide:
    """The query's rows (from the file or through the sidecar's JSON) as plain values, money as Decimal;
    each (bucket, model) holds the metrics its kind's usage report has."""
    side = LedgerSide()
    cols = result.columns
    for row in result.rows:
        r = dict(zip(cols, row))
        key = (datetime.fromtimestamp(int(r["bucket"]), timezone.utc), str(r["model"]))
        have = side.usage.setdefault(key, {"unpriced": 0, "usd": None})
        have["unpriced"] += int(r["unpriced"] or 0)
        if r["usd"] is not None:
            have["usd"] = (have["usd"] or Decimal(0)) + Decimal(str(r["usd"]))
        for m in KIND_METRICS[r["kind"]]:
            if r[m] is None:
                continue  # not recorded by every call: not comparable
            value = Decimal(str(r[m])) if m == "seconds" else int(r[m])
            have[m] = have.get(m, 0) + value
    return side


@dataclass(slots=True)
class Drift:
    ledger: int | Decimal | None
    provider: int | Decimal | None
    absolute: int | Decimal | None
    relative: Decimal | None  # (ledger - provider) / provider; None when the provider reports 0 and the ledger not


@dataclass(slots=True)
class Row:
    bucket: datetime
    width: str  # "1h" (counts only) or "1d" (counts and dollars)
    model: str
    drifts: dict[str, Drift]  # compared metrics only
    cause: str | None  # a key of CAUSES, None when within tolerance
    unpriced: int = 0
    over: bool = False

    @property
    def max_drift(self) -> Decimal | None:
        """The largest relative drift, by size; None when one is unbounded (provider reports 0)."""
        rels = [d.relative for d in self.drifts.values() if d.absolute]
        if any(r is None for r in rels):
            return None
        return max((abs(r) for r in rels), default=Decimal(0))


@dataclass(slots=True)
class Reconciliation:
    run_id: str
    ran_at: datetime
    provider: str
    since: datetime
    until: datetime
    bucket: str
    tolerance: Decimal
    scope: dict[str, Any]
    rows: list[Row]
    ledger_usd: Decimal
    provider_usd: Decimal
    covered_usd: Decimal  # the provider's dollars the ledger accounts for: sum of min(ledger, provider) per day and model
    stored: str | None = None  # where the run was stored, or why not

    @property
    def covered_share(self) -> Decimal | None:
        return None if not self.provider_usd else (self.covered_usd / self.provider_usd)

    @property
    def over(self) -> list[Row]:
        return [r for r in self.rows if r.over]

    @property
    def status(self) -> str:
        return "drift" if self.over else "ok"

    @property
    def max_drift(self) -> Decimal | None:
        drifts = [r.max_drift for r in self.rows]
        if any(d is None for d in drifts):
            return None
        return max(drifts, default=Decimal(0))


def _drift(ledger: Any, provider: Any) -> Drift:
    lv = ledger if ledger is not None else 0
    pv = provider if provider is not None else 0
    absolute = lv - pv
    if pv:
        relative = Decimal(absolute) / Decimal(pv)
    else:
        relative = Decimal(0) if not absolute else None
    return Drift(ledger, provider, absolute, relative)


def _exceeds(d: Drift, tolerance: Decimal) -> bool:
    return bool(d.absolute) and (d.relative is None or abs(d.relative) > tolerance)


def _row(bucket: datetime, width: str, model: str, ledger: dict[str, Any] | None, provider: dict[str, Any] | None,
         metrics: tuple[str, ...], tolerance: Decimal) -> Row:
    lv, pv = ledger or {}, provider or {}
    drifts = {m: _drift(lv.get(m, 0 if m != "usd" else None), pv.get(m, 0 if m != "usd" else None)) for m in metrics}
    over = {m for m, d in drifts.items() if _exceeds(d, tolerance)}
    unpriced = int(lv.get("unpriced", 0))
    cause = None
    if over:
        if not ledger:
            cause = "unseen"
        elif not provider:
            cause = "not_at_provider"
        elif over <= {"usd"}:
            cause = "unpriced" if unpriced and drifts["usd"].absolute < 0 else "mispriced"
        else:
            tokens = [drifts[m].absolute for m in over if m != "usd"]
            cause = "missing_calls" if sum(t < 0 for t in tokens) >= sum(t > 0 for t in tokens) else "extra_calls"
    return Row(bucket, width, model, drifts, cause, unpriced, bool(over))


def _day(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _by_day(usage: dict[Key, dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    days: dict[Key, dict[str, Any]] = {}
    for (start, model), values in usage.items():
        have = days.setdefault((_day(start), model), {})
        for name, value in values.items():
            if value is None:
                have.setdefault(name, None)
            else:
                have[name] = (have.get(name) or 0) + value
    return days


def _compared(ledger: dict[str, Any] | None, provider: dict[str, Any] | None) -> tuple[str, ...]:
    """The counts both sides have for a bucket and model (one side's, when the other has nothing)."""
    sides = [s for s in (ledger, provider) if s]
    return tuple(m for m in COUNTS if sides and all(m in s for s in sides))


def compare(provider: str, report: ProviderReport, ledger: LedgerSide, since: datetime, until: datetime,
            bucket: str, tolerance: Decimal, scope: dict[str, Any], now: datetime | None = None) -> Reconciliation:
    """Rows per bucket and model at the asked width (counts), and per day and model (counts and dollars):
    cost reports come by the day only."""
    rows: list[Row] = []
    if bucket == "1h":
        for key in sorted(set(report.usage) | set(ledger.usage)):
            lv, pv = ledger.usage.get(key), report.usage.get(key)
            rows.append(_row(key[0], "1h", key[1], lv, pv, _compared(lv, pv), tolerance))
    provider_days = _by_day(report.usage)
    for key, usd in report.costs.items():
        provider_days.setdefault(key, {})["usd"] = usd
    ledger_days = _by_day(ledger.usage)
    covered = Decimal(0)
    for key in sorted(set(provider_days) | set(ledger_days)):
        p, lv = provider_days.get(key), ledger_days.get(key)
        rows.append(_row(key[0], "1d", key[1], lv, p, (*_compared(lv, p), "usd"), tolerance))
        pu, lu = (p or {}).get("usd") or Decimal(0), (lv or {}).get("usd") or Decimal(0)
        covered += max(Decimal(0), min(pu, lu))
    provider_usd = sum((d.get("usd") or Decimal(0) for d in provider_days.values()), Decimal(0))
    ledger_usd = sum((d.get("usd") or Decimal(0) for d in ledger_days.values()), Decimal(0))
    return Reconciliation(uuid.uuid4().hex, now or datetime.now(timezone.utc), provider, since, until, bucket,
                          tolerance, scope, rows, ledger_usd, provider_usd, covered)


# --- storage: the `reconciliations` table and its `reconciliation_rows` (jobs/reconcile_store.py)

def records(run: Reconciliation) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run as its `reconciliations` row and its `reconciliation_rows`, plain values, money as Decimal.
    `max_drift` None: unbounded (the provider reports 0 where the ledger has some)."""
    head = {"run_id": run.run_id, "ran_at": run.ran_at, "provider": run.provider, "since": run.since,
            "until": run.until, "bucket": run.bucket, "tolerance": run.tolerance, "scope": run.scope,
            "ledger_usd": run.ledger_usd, "provider_usd": run.provider_usd, "covered_share": _ratio(run.covered_share),
            "rows_over": len(run.over), "max_drift": _ratio(run.max_drift), "status": run.status}
    rows = []
    for r in run.rows:
        row: dict[str, Any] = {"bucket": r.bucket, "width": r.width, "model": r.model}
        for m in METRICS:
            d = r.drifts.get(m)
            row[f"ledger_{m}"], row[f"provider_{m}"] = (d.ledger, d.provider) if d else (None, None)
        row.update(unpriced_calls=r.unpriced, max_drift=_ratio(r.max_drift), cause=r.cause)
        rows.append(row)
    return head, rows


def store(con: Any, run: Reconciliation) -> None:
    """Appends the run and its rows to the ledger file in one transaction."""
    reconcile_store.insert(con, *records(run))


def parts(run: Reconciliation, max_bytes: int | None = None) -> list[bytes]:
    """The run as the request bodies a running sidecar stores it from (POST /_meterline/reconciliations),
    each of about reconcile_store.PART_BYTES at most."""
    return reconcile_store.parts(*records(run), max_bytes=max_bytes or reconcile_store.PART_BYTES)


def _ratio(value: Decimal | None) -> Decimal | None:
    # DECIMAL(38, 12) holds 26 digits before the point: a drift ratio that large is clamped, not lost
    return None if value is None else min(value, Decimal("1e25")).quantize(Decimal("1e-12"))


# --- output

def _num(value: Any, money: bool = True) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return f"${value.normalize():f}" if money else f"{value.normalize():,f}"
    return f"{value:,}"


def _pct(value: Decimal | None) -> str:
    return "unbounded" if value is None else f"{value * 100:+.2f}%"


def _cell(d: Drift | None, metric: str) -> str:
    if d is None:
        return ""
    money = metric == "usd"
    if not d.absolute:
        return f"{_num(d.ledger if d.ledger is not None else 0, money)} ="
    sign = "+" if d.absolute > 0 else "-"
    return (f"{_num(d.ledger, money)} / {_num(d.provider, money)} "
            f"({sign}{_num(abs(d.absolute), money)}, {_pct(d.relative)})")


_HEADINGS = {"requests": "requests", "uncached_input": "uncached in", "cache_read": "cache read",
             "cache_write": "cache write", "output": "output", "images": "images", "seconds": "audio s", "usd": "usd"}


def table(run: Reconciliation) -> sql.Result:
    """The rows for people: a column per metric some row compares (images and audio seconds only when present)."""
    shown = [m for m in METRICS if m in ("requests", "uncached_input", "cache_read", "cache_write", "output", "usd")
             or any(m in r.drifts for r in run.rows)]
    cols = ["bucket", "model", *(_HEADINGS[m] for m in shown), "max drift", "cause"]
    rows = []
    for r in run.rows:
        stamp = r.bucket.strftime("%Y-%m-%d %H:00" if r.width == "1h" else "%Y-%m-%d")
        rows.append((stamp, r.model, *(_cell(r.drifts.get(m), m) for m in shown),
                     "unbounded" if r.max_drift is None else f"{r.max_drift * 100:.2f}%", r.cause or ""))
    return sql.Result(cols, rows)


def summary_lines(run: Reconciliation) -> list[str]:
    share = run.covered_share
    lines = [
        f"{run.provider} {run.since:%Y-%m-%d %H:%M} .. {run.until:%Y-%m-%d %H:%M} UTC, {run.bucket} buckets, "
        f"tolerance {(run.tolerance * 100).normalize():f}%: {run.status.upper()} ({len(run.over)} of {len(run.rows)} rows over)",
        f"dollars: ledger {_num(run.ledger_usd)}, provider {_num(run.provider_usd)}; the ledger covers "
        + ("n/a (the provider reports no spend)" if share is None else f"{share * 100:.2f}% of the provider's spend"),
    ]
    causes: dict[str, int] = {}
    for r in run.over:
        causes[r.cause or ""] = causes.get(r.cause or "", 0) + 1
    for cause, n in sorted(causes.items()):
        lines.append(f"  {cause}: {n} row{'s' if n != 1 else ''}: {CAUSES.get(cause, '')}")
    lines.append("ledger / provider in each cell; '=' when they agree; drift is (ledger - provider) / provider")
    return lines


def to_json(run: Reconciliation) -> str:
    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Decimal) else v.isoformat() if isinstance(v, datetime) else v

    doc = {
        "run_id": run.run_id, "ran_at": run.ran_at, "provider": run.provider, "since": run.since, "until": run.until,
        "bucket": run.bucket, "tolerance": run.tolerance, "scope": run.scope, "status": run.status,
        "ledger_usd": run.ledger_usd, "provider_usd": run.provider_usd, "covered_share": run.covered_share,
        "max_drift": run.max_drift, "rows_over": len(run.over), "stored": run.stored,
        "rows": [{"bucket": r.bucket, "width": r.width, "model": r.model, "cause": r.cause, "over": r.over,
                  "unpriced_calls": r.unpriced, "max_drift": r.max_drift,
                  "metrics": {m: {"ledger": d.ledger, "provider": d.provider, "drift": d.absolute,
                                  "drift_relative": d.relative} for m, d in r.drifts.items()}} for r in run.rows],
    }
    return orjson.dumps(doc, default=plain, option=orjson.OPT_INDENT_2).decode()


def window(since: str, until: str | None, bucket: str, now: datetime | None = None) -> tuple[datetime, datetime]:
    """[since, until) from `--since 7d|36h|2026-11-01[T..]` and `--until` (default: the start of the current
    bucket, so only whole buckets are compared). The start snaps to a day: cost reports are daily."""
    now = now or datetime.now(timezone.utc)
    end = _moment(until, "--until") if until else now.replace(minute=0, second=0, microsecond=0)
    if not until and bucket == "1d":
        end = _day(end)
    if since[-1:] in ("d", "h") and since[:-1].isdigit():
        amount = int(since[:-1])
        start = end - (timedelta(days=amount) if since[-1] == "d" else timedelta(hours=amount))
    else:
        start = _moment(since, "--since")
    start = _day(start)
    if start >= end:
        raise ValueError(f"--since {since} is not before --until {end:%Y-%m-%dT%H:%M:%SZ}")
    return start, end


def _moment(text: str, flag: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{flag}: expected a duration such as 7d or 36h, or a date such as 2026-11-01, got {text!r}") from None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)

