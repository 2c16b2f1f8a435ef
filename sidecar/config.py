"""The sidecar's configuration: `meterline.yaml` parsed and validated into plain data, with clear errors."""
from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from exporters.alerts import AlertConfigError, AlertSettings, parse_settings
from exporters.settings import load_settings as load_telemetry_settings
from ledger.budgets import DEFAULT_THRESHOLDS, Rule, RuleError, parse_rule, parse_thresholds
from ledger.money import MAX_AMOUNT_TEXT, non_negative_amount
from ledger.pricing import PriceRule
from ledger.defaults import DEFAULT_MEMORY_LIMIT, DEFAULT_THREADS

from jobs.settings import JobsConfig, JobsConfigError, parse as parse_jobs
from jobs.reconcile_config import ReconcileConfig, ReconcileConfigError, parse as parse_reconcile
from jobs.reconcile_config import _expand as expand_env  # `${NAME}` in a value reads the environment
from fleet.urls import redact

from .hostcheck import allowed_hosts
from .routes.config import Route, RouteConfigError, parse_routes
from .upstream import Origin, origin_of

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8720
DEFAULT_DB = "meterline.duckdb"
_MEMORY = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B|B)", re.IGNORECASE)
ADAPTERS = ("openai", "anthropic", "gemini", "eachlabs")
MAX_LEDGER_THREADS = 256  # DuckDB starts every thread at once: 100000 of them hang start-up
_TIMEOUT_KEYS = ("connect_s", "read_s", "head_s", "body_idle_s")

# name -> (base URL, adapter, genai-prices provider id)
BUILTIN_UPSTREAMS = {
    "openai": ("https://api.openai.com", "openai", "openai"),
    "anthropic": ("https://api.anthropic.com", "anthropic", "anthropic"),
    "gemini": ("https://generativelanguage.googleapis.com", "gemini", "google"),
}
RESERVED_NAMES = ("_meterline", "v1")  # the admin routes; the root paths of One API (/v1/...)
INSTANCE_MAX = 200  # characters of `fleet.instance`


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the problem."""


@dataclass(slots=True)
class Upstream:
    name: str
    base_url: str  # no trailing slash
    adapter: str
    provider: str
    host: str = ""  # of base_url, for telemetry's server.address / server.port
    port: int = 0
    origin: Origin | None = None  # where the hot path's client sends its requests
    api_key: str | None = None  # `api_key:` (${NAME} reads the environment): lets the sinks process poll jobs itself


@dataclass(slots=True)
class FleetConfig:
    """`fleet:` many sidecars sharing budgets (Redis, docs/fleet-budgets.md) and a ledger (Postgres,
    docs/fleet.md). URLs keep their secrets here, after `${NAME}` expansion: show them only through
    fleet.urls.redact."""

    instance: str = field(default_factory=socket.gethostname)  # every row's `instance` column
    # repr=False: a Config printed or logged by accident shows no password
    postgres: str | None = field(default=None, repr=False)  # the fleet ledger; None: rows stay in this DuckDB only
    redis: str | None = field(default=None, repr=False)  # budget accounts, rules, top-ups and alert state shared
    on_redis_down: str = "local"  # local | closed | open: admission while Redis does not answer
    lease_ttl_s: float = 30.0  # a lease its holder stops renewing (a killed sidecar) goes back after this
    lease_idle_s: float = 1.0  # allowance a holder leased but did not use for this long goes back
    sync_ms: int = 50  # how often a holder settles its spend to Redis and renews its leases
    ship_interval_s: float = 1.0  # how often new rows go to Postgres
    retry_s: float = 5.0  # wait after Postgres failed (down, refused) before trying again
    batch_rows: int = 5000  # rows per COPY
    connect_timeout_s: float = 5.0


REDIS_DOWN_POLICIES = ("local", "closed", "open")


@dataclass(slots=True)
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    app: str | None = None
    ledger_path: str = DEFAULT_DB
    ledger_memory_limit: str = DEFAULT_MEMORY_LIMIT  # DuckDB's: its block cache and queries share it
    ledger_threads: int = DEFAULT_THREADS
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    prices: list[PriceRule] = field(default_factory=list)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0  # longest silence allowed on an upstream socket
    head_timeout_s: float = 30.0  # an app's request head must be whole this long after its first byte
    body_idle_timeout_s: float = 60.0  # longest silence allowed inside an app's request body
    budgets: list[Rule] = field(default_factory=list)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    thresholds: tuple = DEFAULT_THRESHOLDS  # default alert thresholds of every rule
    admin_token: str | None = None  # required by the budget API; always, when listening beyond loopback
    default_max_output_tokens: int = 32_768  # reservation for calls without max tokens on unknown models
    telemetry: dict[str, Any] = field(default_factory=dict)
    jaeger_ui_url: str | None = None  # telemetry.jaeger_ui_url: where the dashboard links traces
    # Host header values served besides loopback names (see sidecar/hostcheck.py); set by parse()
    allowed_hosts: frozenset[str] = frozenset()
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)  # `meterline reconcile`'s admin APIs
    sql_timeout_s: float = 30.0  # sql.timeout_s: a query running longer is interrupted
    sql_max_concurrent: int = 4  # sql.max_concurrent: queries at once (each on a thread of its own); 503 past it
    workers: int = 1  # forwarder processes on the one port (`--workers`); see check_workers
    fleet: FleetConfig = field(default_factory=FleetConfig)
    routes: dict[str, Route] = field(default_factory=dict)  # routes: model names standing for targets
    jobs: JobsConfig = field(default_factory=JobsConfig)  # `jobs:`: async media jobs (docs/jobs.md)
    translate: TranslateConfig = field(default_factory=lambda: TranslateConfig())  # `translate:` (docs/one-api.md)


@dataclass(slots=True)
class TranslateConfig:
    """`translate:`: One API (docs/one-api.md). Fetching image URLs for an upstream that takes only
    inline images (Gemini) makes the sidecar fetch URLs the app names, so it is off unless asked."""

    fetch_images: bool = False
    max_image_bytes: int = 10 * 1024 * 1024
    image_timeout_s: float = 10.0


_TOP_KEYS = {"listen", "app", "ledger", "upstreams", "prices", "budgets", "alerts", "telemetry", "timeouts",
             "admin_token", "default_max_output_tokens", "allowed_hosts", "reconcile", "sql", "workers",
             "fleet", "routes", "jobs", "translate"}
MAX_WORKERS = 64


def load(path: str | os.PathLike[str] | None) -> Config:
    """Reads the config file (None: defaults only); raises ConfigError naming the bad key."""
    doc: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}  # libyaml when present
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return parse(doc)


def parse(doc: Any) -> Config:
    if not isinstance(doc, dict):
        raise ConfigError("config must be a mapping of keys to values")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown config key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    cfg = Config()
    if "listen" in doc:
        cfg.host, cfg.port = _listen(doc["listen"])
    cfg.app = _str(doc, "app") or os.environ.get("OTEL_SERVICE_NAME") or None
    ledger = _map(doc, "ledger")
    unknown = set(ledger) - {"path", "memory_limit", "threads"}
    if unknown:
        raise ConfigError(f"unknown config key 'ledger.{sorted(unknown)[0]}' (known: memory_limit, path, threads)")
    if "path" in ledger:
        cfg.ledger_path = _ledger_path(_str(ledger, "path", "ledger.path"))
    if "memory_limit" in ledger:
        limit = ledger["memory_limit"]
        if not isinstance(limit, str) or not _MEMORY.fullmatch(limit.strip()):
            raise ConfigError(f"config key 'ledger.memory_limit': expected a size such as '128MB' or '1GiB', got {limit!r}")
        cfg.ledger_memory_limit = limit.strip()
    if "threads" in ledger:
        threads = ledger["threads"]
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 < threads <= MAX_LEDGER_THREADS:
            raise ConfigError(f"config key 'ledger.threads': expected a positive whole number, got {threads!r} "
                              f"(at most {MAX_LEDGER_THREADS})")
        cfg.ledger_threads = threads
    cfg.upstreams = _upstreams(_map(doc, "upstreams"))
    cfg.prices = [_price(i, p) for i, p in enumerate(_list(doc, "prices"))]
    cfg.routes = _routes(doc.get("routes"), cfg.upstreams)
    cfg.translate = _translate(_map(doc, "translate"))
    timeouts = _map(doc, "timeouts")
    unknown = set(timeouts) - set(_TIMEOUT_KEYS)
    if unknown:
        raise ConfigError(f"unknown config key 'timeouts.{sorted(map(str, unknown))[0]}' "
                          f"(known: {', '.join(_TIMEOUT_KEYS)})")
    cfg.connect_timeout_s = _positive(timeouts, "connect_s", cfg.connect_timeout_s)
    cfg.read_timeout_s = _positive(timeouts, "read_s", cfg.read_timeout_s)
    cfg.head_timeout_s = _positive(timeouts, "head_s", cfg.head_timeout_s)
    cfg.body_idle_timeout_s = _positive(timeouts, "body_idle_s", cfg.body_idle_timeout_s)
    alerts = _map(doc, "alerts")
    try:
        cfg.alerts = parse_settings(alerts)
        if "thresholds" in alerts:
            cfg.thresholds = parse_thresholds(alerts["thresholds"], "alerts.thresholds")
        cfg.budgets = [parse_rule(rule, f"budgets[{i}]", cfg.thresholds) for i, rule in enumerate(_list(doc, "budgets"))]
    except AlertConfigError as e:
        raise ConfigError(str(e)) from None
    except RuleError as e:
        raise ConfigError(f"config key {e}") from None
    names = [r.name for r in cfg.budgets]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'budgets': two rules are named {max(names, key=names.count)!r}")
    try:
        cfg.reconcile = parse_reconcile(doc.get("reconcile"))
    except ReconcileConfigError as e:
        raise ConfigError(str(e)) from None
    try:
        cfg.jobs = parse_jobs(doc.get("jobs"))
    except JobsConfigError as e:
        raise ConfigError(str(e)) from None
    hosts = _list(doc, "allowed_hosts")
    if not all(isinstance(h, str) and h.strip() for h in hosts):
        raise ConfigError("config key 'allowed_hosts': expected a list of host names, e.g. [meterline.internal]")
    cfg.allowed_hosts = allowed_hosts(cfg.host, hosts)
    sql_doc = _map(doc, "sql")
    if set(sql_doc) - {"timeout_s", "max_concurrent"}:
        raise ConfigError(f"unknown config key 'sql.{sorted(set(sql_doc) - {'timeout_s', 'max_concurrent'})[0]}' "
                          "(known: max_concurrent, timeout_s)")
    timeout = sql_doc.get("timeout_s", cfg.sql_timeout_s)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ConfigError(f"config key 'sql.timeout_s': expected a positive number of seconds, got {timeout!r}")
    cfg.sql_timeout_s = float(timeout)
    most = sql_doc.get("max_concurrent", cfg.sql_max_concurrent)
    if isinstance(most, bool) or not isinstance(most, int) or not 0 < most <= 64:
        raise ConfigError(f"config key 'sql.max_concurrent': expected a whole number from 1 to 64, got {most!r}")
    cfg.sql_max_concurrent = most
    cfg.fleet = parse_fleet(_map(doc, "fleet"))
    if "workers" in doc:
        cfg.workers = doc["workers"]
    check_workers(cfg, "workers")
    cfg.admin_token = _str(doc, "admin_token") or os.environ.get("METERLINE_ADMIN_TOKEN") or None
    if "default_max_output_tokens" in doc:
        value = doc["default_max_output_tokens"]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config key 'default_max_output_tokens': expected a positive whole number, got {value!r}")
        cfg.default_max_output_tokens = value
    cfg.telemetry = _map(doc, "telemetry")
    try:
        load_telemetry_settings(cfg.telemetry, os.environ, cfg.app)
    except ValueError as e:
        raise ConfigError(f"config key {e}") from None
    jaeger = cfg.telemetry.get("jaeger_ui_url")
    if jaeger is not None:
        parts = urlsplit(jaeger) if isinstance(jaeger, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"config key 'telemetry.jaeger_ui_url': expected an http(s) URL, got {jaeger!r}")
        cfg.jaeger_ui_url = jaeger.rstrip("/")
    return cfg


_FLEET_KEYS = ("instance", "postgres", "redis", "on_redis_down", "lease_ttl_s", "lease_idle_s", "sync_ms",
               "ship_interval_s", "retry_s", "batch_rows", "connect_timeout_s")


def parse_fleet(doc: dict[str, Any], environ: Any = None) -> FleetConfig:
    """The `fleet:` mapping. Errors name the key and never show a URL's password."""
    env = os.environ if environ is None else environ
    unknown = set(doc) - set(_FLEET_KEYS)
    if unknown:
        raise ConfigError(f"unknown config key 'fleet.{sorted(map(str, unknown))[0]}' (known: {', '.join(_FLEET_KEYS)})")
    fleet = FleetConfig()

    def text(key: str) -> str | None:
        if doc.get(key) is None:
            return None
        try:
            return expand_env(doc[key], f"fleet.{key}", env).strip() or None
        except ReconcileConfigError as e:
            raise ConfigError(str(e)) from None

    instance = text("instance")
    if instance is not None:
        if len(instance) > INSTANCE_MAX or not instance.isprintable():
            raise ConfigError(f"config key 'fleet.instance': expected a printable name of at most {INSTANCE_MAX} "
                              f"characters, got {instance[:40]!r}")
        fleet.instance = instance
    fleet.postgres = text("postgres")
    if fleet.postgres is not None:
        scheme = urlsplit(fleet.postgres).scheme if "://" in fleet.postgres else ""
        if scheme not in ("postgresql", "postgres"):
            raise ConfigError("config key 'fleet.postgres': expected a URL such as "
                              f"postgresql://USER:PASSWORD@HOST:5432/DB, got {redact(fleet.postgres)!r}")
    fleet.redis = text("redis")
    if fleet.redis is not None:
        parts = urlsplit(fleet.redis)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise ConfigError("config key 'fleet.redis': expected a URL such as redis://HOST:6379/0, "
                              f"got {redact(fleet.redis)!r}")
    policy = doc.get("on_redis_down", fleet.on_redis_down)
    if policy not in REDIS_DOWN_POLICIES:
        raise ConfigError(f"config key 'fleet.on_redis_down': expected one of {', '.join(REDIS_DOWN_POLICIES)}, "
                          f"got {policy!r}")
    fleet.on_redis_down = policy
    for key in ("lease_ttl_s", "lease_idle_s"):
        value = doc.get(key, getattr(fleet, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"config key 'fleet.{key}': expected a positive number of seconds, got {value!r}")
        setattr(fleet, key, float(value))
    sync = doc.get("sync_ms", fleet.sync_ms)
    if isinstance(sync, bool) or not isinstance(sync, int) or not 5 <= sync <= 1000:
        raise ConfigError(f"config key 'fleet.sync_ms': expected a whole number of milliseconds from 5 to 1000, "
                          f"got {sync!r}")
    fleet.sync_ms = sync
    if fleet.lease_ttl_s * 1000 < 4 * fleet.sync_ms:
        raise ConfigError(f"config key 'fleet.lease_ttl_s': {fleet.lease_ttl_s:g} s would let leases expire between "
                          f"two syncs of a live sidecar (fleet.sync_ms {fleet.sync_ms}): give at least "
                          f"{4 * fleet.sync_ms / 1000:g} s")
    for key in ("ship_interval_s", "retry_s", "connect_timeout_s"):
        if key in doc:
            value = doc[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 3600:
                raise ConfigError(f"config key 'fleet.{key}': expected a positive number of seconds below 3600, "
                                  f"got {value!r}")
            setattr(fleet, key, float(value))
    if "batch_rows" in doc:
        value = doc["batch_rows"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 100_000:
            raise ConfigError(f"config key 'fleet.batch_rows': expected a whole number from 1 to 100000, got {value!r}")
        fleet.batch_rows = value
    return fleet


def _listen(value: Any) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"config key 'listen': expected HOST:PORT like 127.0.0.1:8720, got {value!r}")
    return host.strip("[]"), int(port)


def _upstreams(doc: dict[str, Any]) -> dict[str, Upstream]:
    result = {name: _upstream(name, url, adapter, provider)
              for name, (url, adapter, provider) in BUILTIN_UPSTREAMS.items()}
    for name, spec in doc.items():
        key = f"upstreams.{name}"
        if not isinstance(name, str) or not name or "/" in name or name in RESERVED_NAMES:
            raise ConfigError(f"config key {key!r}: not a usable route name")
        if not isinstance(spec, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping with base_url")
        known = {"base_url", "adapter", "provider", "api_key"}
        if set(spec) - known:
            raise ConfigError(f"config key '{key}.{sorted(set(spec) - known)[0]}': unknown (known: adapter, api_key, base_url, provider)")
        builtin = BUILTIN_UPSTREAMS.get(name)
        url = spec.get("base_url", builtin[0] if builtin else None)
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"config key '{key}.base_url': expected an http(s) URL, got {url!r}")
        try:
            parts.port  # noqa: B018 - urlsplit checks the port only when asked
        except ValueError:
            raise ConfigError(f"config key '{key}.base_url': the port is not a number from 0 to 65535, "
                              f"got {url!r}") from None
        adapter = spec.get("adapter", builtin[1] if builtin else "openai")
        if adapter not in ADAPTERS:
            raise ConfigError(f"config key '{key}.adapter': expected one of {', '.join(ADAPTERS)}, got {adapter!r}")
        provider = spec.get("provider", builtin[2] if builtin else name)
        if not isinstance(provider, str) or not provider:
            raise ConfigError(f"config key '{key}.provider': expected a provider id such as 'groq'")
        try:
            result[name] = _upstream(name, url, adapter, provider)
        except ValueError as e:
            raise ConfigError(f"config key '{key}.base_url': {e}, got {url!r}") from None
        if spec.get("api_key") is not None:
            result[name].api_key = _env_value(spec["api_key"], f"{key}.api_key")
    return result


def _translate(doc: dict[str, Any]) -> TranslateConfig:
    out = TranslateConfig()
    unknown = set(doc) - {"fetch_images", "max_image_bytes", "image_timeout_s"}
    if unknown:
        raise ConfigError(f"unknown config key 'translate.{sorted(map(str, unknown))[0]}' "
                          "(known: fetch_images, image_timeout_s, max_image_bytes)")
    fetch = doc.get("fetch_images", False)
    if not isinstance(fetch, bool):
        raise ConfigError(f"config key 'translate.fetch_images': expected true or false, got {fetch!r}")
    out.fetch_images = fetch
    size = doc.get("max_image_bytes", out.max_image_bytes)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"config key 'translate.max_image_bytes': expected a positive whole number, got {size!r}")
    out.max_image_bytes = size
    wait = doc.get("image_timeout_s", out.image_timeout_s)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 < wait <= 600:
        raise ConfigError(f"config key 'translate.image_timeout_s': expected seconds above 0 (at most 600), got {wait!r}")
    out.image_timeout_s = float(wait)
    return out


def _routes(doc: Any, upstreams: dict[str, Upstream]) -> dict[str, Route]:
    try:
        return parse_routes(doc, upstreams)
    except RouteConfigError as e:
        raise ConfigError(str(e)) from None


def _upstream(name: str, url: str, adapter: str, provider: str) -> Upstream:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Upstream(name, url.rstrip("/"), adapter, provider, parts.hostname or "", port, origin_of(url))


_PRICE_KEYS = ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok",
               "per_image", "per_second")


def _env_value(value: Any, key: str) -> str:
    """A string whose ${NAME} parts are read from the environment (secrets stay out of files)."""
    try:
        return expand_env(value, key, os.environ)
    except ReconcileConfigError as e:
        raise ConfigError(str(e)) from None


def _by_resolution(value: Any, key: str) -> tuple[tuple[str, Decimal | None, Decimal | None], ...]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"config key {key!r}: expected a mapping such as {{1080p: {{per_second: 0.5}}}}")
    out = []
    for name, rates in value.items():
        where = f"{key}.{name}"
        if not isinstance(rates, dict) or not rates or set(rates) - {"per_second", "per_image"}:
            raise ConfigError(f"config key {where!r}: expected per_second and/or per_image")
        out.append((str(name), _money(rates["per_second"], f"{where}.per_second") if "per_second" in rates else None,
                    _money(rates["per_image"], f"{where}.per_image") if "per_image" in rates else None))
    return tuple(out)


def _price(i: int, spec: Any) -> PriceRule:
    key = f"prices[{i}]"
    if not isinstance(spec, dict):
        raise ConfigError(f"config key {key!r}: expected a mapping with model and prices")
    unknown = set(spec) - {"provider", "model", "by_resolution", *_PRICE_KEYS}
    if unknown:
        raise ConfigError(f"config key '{key}.{sorted(unknown)[0]}': unknown (known: provider, model, by_resolution, "
                          f"{', '.join(_PRICE_KEYS)})")
    model = spec.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"config key '{key}.model': required, a model name or glob")
    rates: dict[str, Decimal] = {}
    for name in _PRICE_KEYS:
        if name in spec:
            rates[name] = _money(spec[name], f"{key}.{name}")
    by_resolution = _by_resolution(spec["by_resolution"], f"{key}.by_resolution") if "by_resolution" in spec else ()
    if not rates and not by_resolution:
        raise ConfigError(f"config key {key!r}: give at least one of {', '.join(_PRICE_KEYS)}")
    provider = spec.get("provider")
    if provider is not None and not isinstance(provider, str):
        raise ConfigError(f"config key '{key}.provider': expected a provider id")
    return PriceRule(provider=provider, model=model, by_resolution=by_resolution, **rates)


def _money(value: Any, key: str) -> Decimal:
    amount = non_negative_amount(value)
    if amount is None:
        raise ConfigError(f"config key {key!r}: expected a non-negative amount in USD below {MAX_AMOUNT_TEXT} "
                          f"(what the ledger's DECIMAL(38, 12) holds), got {value!r}")
    return amount


def _ledger_path(value: str | None) -> str:
    """A path DuckDB can create or open: not empty, not a directory, not under a file."""
    if not value:
        raise ConfigError("config key 'ledger.path': expected a file name such as meterline.duckdb")
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"config key 'ledger.path': {value!r} is a directory; name the ledger file in it, "
                          "e.g. {value}/meterline.duckdb".replace("{value}", value.rstrip("/")))
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"config key 'ledger.path': {str(parent)!r} is a file, not a directory")
            break
    return value


def _map(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config key {key!r}: expected a mapping, got {type(value).__name__}")
    return value


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"config key {key!r}: expected a list, got {type(value).__name__}")
    return value


def _str(doc: dict[str, Any], key: str, name: str | None = None) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"config key {name or key!r}: expected a string, got {value!r}")
    return value


def _positive(doc: dict[str, Any], key: str, default: float) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config key 'timeouts.{key}': expected a positive number of seconds, got {value!r}")
    return float(value)


def check_workers(cfg: Config, key: str = "--workers") -> None:
    """Workers are whole numbers from 1 to MAX_WORKERS. More than one forwarder needs budget state
    they share: without Redis (`fleet.redis`) each would count only its own calls, so budgets with
    more than one worker are refused rather than enforced wrongly; with it every forwarder leases
    from the same accounts."""
    n = cfg.workers
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_WORKERS:
        raise ConfigError(f"config key {key!r}: expected a whole number of forwarder processes from 1 to "
                          f"{MAX_WORKERS}, got {n!r}")
    if n > 1 and cfg.budgets and not cfg.fleet.redis:
        raise ConfigError(f"config key {key!r}: {n} workers cannot share budgets without Redis (each forwarder "
                          f"would count only its own calls, so rule {cfg.budgets[0].name!r} would let {n} times its "
                          "limit through): set fleet.redis to a Redis URL, run one worker, or remove the budgets")
