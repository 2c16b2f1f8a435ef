"""The `routes:` config key parsed into plain data (Route, Target, Retry, ...), with errors naming the key."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..oneapi import pairs

STRATEGIES = ("fallback", "weighted", "cheapest", "fastest")
# what a failure may be; statuses are listed as numbers (429, 503) or classes ("5xx")
_CLASSES = ("timeout", "network")
DEFAULT_FALLBACK_ON = (429, "5xx", "timeout", "network")
_ROUTE_KEYS = ("strategy", "targets", "retry", "fallback_on", "timeouts", "circuit", "rules")
_RULE_WHEN = ("input_tokens_below", "input_tokens_at_least", "max_tokens_below", "max_tokens_at_least",
              "stream", "tags", "app", "user")


class RouteConfigError(ValueError):
    """A route is malformed; the message names the config key."""


@dataclass(frozen=True, slots=True)
class Target:
    upstream: str
    model: str
    weight: float = 1.0
    # the provider key this target's tries carry instead of the app's (`api_key: ${GROQ_API_KEY}`);
    # None: the app's own key is passed on
    api_key: str | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        """`<upstream>/<model>`: the served-by header, the arm, the circuit's name."""
        return f"{self.upstream}/{self.model}"


@dataclass(frozen=True, slots=True)
class Retry:
    attempts: int = 1  # tries per target (1: no retry of the same target)
    backoff_ms: float = 250.0  # first wait; doubles per retry, with jitter
    max_wait_s: float = 20.0  # the most a call waits in backoffs (and retry-after) in total


@dataclass(frozen=True, slots=True)
class Timeouts:
    ttft_s: float | None = None  # the first body bytes must come this soon after the request is sent
    total_s: float | None = None  # no new attempt starts past this since the call began


@dataclass(frozen=True, slots=True)
class Circuit:
    failures: int = 5  # this many failures of a target within window_s open its circuit
    window_s: float = 60.0
    cooldown_s: float = 30.0  # then one probe call is let through (half open)


@dataclass(frozen=True, slots=True)
class FallbackOn:
    statuses: frozenset[int] = frozenset()
    classes: frozenset[int] = frozenset()  # 4 for "4xx", 5 for "5xx"
    timeout: bool = True
    network: bool = True

    def status(self, code: int) -> bool:
        return code in self.statuses or code // 100 in self.classes


@dataclass(frozen=True, slots=True)
class Rule:
    """Picks `use` first when every condition of `when` holds (absent conditions hold)."""

    use: int  # index into the route's targets
    input_tokens_below: int | None = None
    input_tokens_at_least: int | None = None
    max_tokens_below: int | None = None
    max_tokens_at_least: int | None = None
    stream: bool | None = None
    tags: tuple[tuple[str, str], ...] = ()
    app: str | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    adapter: str  # the wire format of the first target (and of every target unless `mixed`)
    strategy: str
    targets: tuple[Target, ...]
    retry: Retry = field(default_factory=Retry)
    fallback_on: FallbackOn = field(default_factory=FallbackOn)
    timeouts: Timeouts = field(default_factory=Timeouts)
    circuit: Circuit = field(default_factory=Circuit)
    rules: tuple[Rule, ...] = ()
    # targets of several wire formats, each reachable by translation (sidecar/oneapi): the route is
    # called on the root paths (/v1/chat/completions, /v1/messages), each try translated for its target
    mixed: bool = False


def parse_routes(doc: Any, upstreams: dict[str, Any]) -> dict[str, Route]:
    """`routes:` -> {name: Route}. `upstreams` are the config's (name -> an object with `adapter`)."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise RouteConfigError(f"config key 'routes': expected a mapping of route names, got {type(doc).__name__}")
    routes = {}
    for name, spec in doc.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise RouteConfigError(f"config key 'routes.{name}': a route name is a model name without '/'")
        routes[name] = _route(name, spec, upstreams)
    return routes


def _route(name: str, spec: Any, upstreams: dict[str, Any]) -> Route:
    key = f"routes.{name}"
    if not isinstance(spec, dict):
        raise RouteConfigError(f"config key {key!r}: expected a mapping with targets")
    unknown = set(spec) - set(_ROUTE_KEYS)
    if unknown:
        raise RouteConfigError(f"config key '{key}.{sorted(map(str, unknown))[0]}': unknown "
                               f"(known: {', '.join(_ROUTE_KEYS)})")
    strategy = spec.get("strategy", "fallback")
    if strategy not in STRATEGIES:
        raise RouteConfigError(f"config key '{key}.strategy': expected one of {', '.join(STRATEGIES)}, "
                               f"got {strategy!r}")
    raw_targets = spec.get("targets")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise RouteConfigError(f"config key '{key}.targets': expected a list of {{upstream, model}}")
    targets = tuple(_target(f"{key}.targets[{i}]", t, upstreams) for i, t in enumerate(raw_targets))
    adapter = upstreams[targets[0].upstream].adapter
    formats = {upstreams[t.upstream].adapter for t in targets}
    mixed = len(formats) > 1
    if mixed and not pairs.mixable(formats):
        for i, t in enumerate(targets):
            other = upstreams[t.upstream].adapter
            if other != adapter:
                raise RouteConfigError(
                    f"config key '{key}.targets[{i}]' ({t.key}): upstream {t.upstream!r} speaks the {other} wire "
                    f"format but the route's first target speaks {adapter}, and no translator (\"One API\") joins "
                    f"them; a route may mix only {', '.join(sorted(pairs.CHAT_FORMATS))} targets")
    keys = [t.key for t in targets]
    if len(set(keys)) != len(keys):
        raise RouteConfigError(f"config key '{key}.targets': {max(keys, key=keys.count)} is listed twice")
    if strategy == "weighted" and not any(t.weight > 0 for t in targets):
        raise RouteConfigError(f"config key '{key}.targets': a weighted route needs a target with weight above 0")
    rules = tuple(_rule(f"{key}.rules[{i}]", r, targets) for i, r in enumerate(_list(spec, "rules", key)))
    return Route(name, adapter, strategy, targets, _retry(spec.get("retry"), f"{key}.retry"),
                 _fallback_on(spec.get("fallback_on"), f"{key}.fallback_on"),
                 _timeouts(spec.get("timeouts"), f"{key}.timeouts"),
                 _circuit(spec.get("circuit"), f"{key}.circuit"), rules, mixed)


def _target(key: str, spec: Any, upstreams: dict[str, Any]) -> Target:
    if not isinstance(spec, dict):
        raise RouteConfigError(f"config key {key!r}: expected a mapping {{upstream, model, weight}}")
    unknown = set(spec) - {"upstream", "model", "weight", "api_key"}
    if unknown:
        raise RouteConfigError(f"config key '{key}.{sorted(map(str, unknown))[0]}': unknown "
                               "(known: api_key, upstream, model, weight)")
    upstream = spec.get("upstream")
    if not isinstance(upstream, str) or upstream not in upstreams:
        raise RouteConfigError(f"config key '{key}.upstream': expected the name of an upstream "
                               f"({', '.join(sorted(upstreams))}), got {upstream!r}")
    model = spec.get("model")
    if not isinstance(model, str) or not model.strip():
        raise RouteConfigError(f"config key '{key}.model': required, the model name the upstream knows")
    weight = spec.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise RouteConfigError(f"config key '{key}.weight': expected a number >= 0, got {weight!r}")
    api_key = spec.get("api_key")
    if api_key is not None:
        api_key = _expand(api_key, f"{key}.api_key")
    return Target(upstream, model, float(weight), api_key)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, key: str) -> str:
    """`${NAME}` references replaced by the environment's values (a key is best kept out of the file)."""
    if not isinstance(value, str) or not value.strip():
        raise RouteConfigError(f"config key {key!r}: expected a key or ${{NAME}} of an environment variable")

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in os.environ:
            raise RouteConfigError(f"config key {key!r}: environment variable {m.group(1)} is not set")
        return os.environ[m.group(1)]

    expanded = _ENV_REF.sub(sub, value).strip()
    if not expanded or any(c in expanded for c in "\r\n"):
        raise RouteConfigError(f"config key {key!r}: the key is empty or spans lines")
    return expanded


def _retry(spec: Any, key: str) -> Retry:
    doc = _mapping(spec, key, ("attempts", "backoff_ms", "max_wait_s"))
    attempts = doc.get("attempts", 1)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 10:
        raise RouteConfigError(f"config key '{key}.attempts': expected tries per target from 1 to 10, got {attempts!r}")
    return Retry(attempts, _number(doc, "backoff_ms", key, 250.0, zero=True),
                 _number(doc, "max_wait_s", key, 20.0, zero=True))


def _timeouts(spec: Any, key: str) -> Timeouts:
    doc = _mapping(spec, key, ("ttft_s", "total_s"))
    return Timeouts(_number(doc, "ttft_s", key, None), _number(doc, "total_s", key, None))


def _circuit(spec: Any, key: str) -> Circuit:
    doc = _mapping(spec, key, ("failures", "window_s", "cooldown_s"))
    failures = doc.get("failures", 5)
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
        raise RouteConfigError(f"config key '{key}.failures': expected a whole number >= 1, got {failures!r}")
    return Circuit(failures, _number(doc, "window_s", key, 60.0), _number(doc, "cooldown_s", key, 30.0))


def _fallback_on(spec: Any, key: str) -> FallbackOn:
    items = DEFAULT_FALLBACK_ON if spec is None else spec
    if not isinstance(items, (list, tuple)):
        raise RouteConfigError(f"config key {key!r}: expected a list such as [429, 5xx, timeout, network]")
    statuses: set[int] = set()
    classes: set[int] = set()
    timeout = network = False
    for item in items:
        text = str(item).strip().lower()
        if text == "timeout":
            timeout = True
        elif text == "network":
            network = True
        elif len(text) == 3 and text[0] in "45" and text[1:] == "xx":
            classes.add(int(text[0]))
        elif text.isdigit() and 400 <= int(text) <= 599:
            statuses.add(int(text))
        else:
            raise RouteConfigError(f"config key {key!r}: {item!r} is not a status (429), a class (5xx), "
                                   f"'timeout' or 'network'")
    return FallbackOn(frozenset(statuses), frozenset(classes), timeout, network)


def _rule(key: str, spec: Any, targets: tuple[Target, ...]) -> Rule:
    if not isinstance(spec, dict) or set(spec) - {"when", "use"} or "use" not in spec:
        raise RouteConfigError(f"config key {key!r}: expected {{when: {{...}}, use: <upstream>/<model>}}")
    use = spec["use"]
    keys = [t.key for t in targets]
    if isinstance(use, int) and not isinstance(use, bool) and 0 <= use < len(targets):
        index = use
    elif use in keys:
        index = keys.index(use)
    else:
        raise RouteConfigError(f"config key '{key}.use': expected one of the route's targets "
                               f"({', '.join(keys)}), got {use!r}")
    when = _mapping(spec.get("when"), f"{key}.when", _RULE_WHEN)
    counts = {}
    for name in ("input_tokens_below", "input_tokens_at_least", "max_tokens_below", "max_tokens_at_least"):
        value = when.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise RouteConfigError(f"config key '{key}.when.{name}': expected a whole number >= 0, got {value!r}")
        counts[name] = value
    stream = when.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RouteConfigError(f"config key '{key}.when.stream': expected true or false, got {stream!r}")
    tags = when.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise RouteConfigError(f"config key '{key}.when.tags': expected a mapping of tag names to values")
    for name in ("app", "user"):
        if when.get(name) is not None and not isinstance(when[name], str):
            raise RouteConfigError(f"config key '{key}.when.{name}': expected a string, got {when[name]!r}")
    return Rule(index, stream=stream, tags=tuple(sorted(tags.items())), app=when.get("app"),
                user=when.get("user"), **counts)


def _mapping(spec: Any, key: str, known: tuple[str, ...]) -> dict[str, Any]:
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise RouteConfigError(f"config key {key!r}: expected a mapping ({', '.join(known)})")
    unknown = set(spec) - set(known)
    if unknown:
        raise RouteConfigError(f"config key '{key}.{sorted(map(str, unknown))[0]}': unknown (known: {', '.join(known)})")
    return spec


def _list(spec: dict[str, Any], name: str, key: str) -> list[Any]:
    value = spec.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RouteConfigError(f"config key '{key}.{name}': expected a list")
    return value


def _number(doc: dict[str, Any], name: str, key: str, default: float | None, zero: bool = False) -> float | None:
    value = doc.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero):
        raise RouteConfigError(f"config key '{key}.{name}': expected a {'non-negative' if zero else 'positive'} "
                               f"number, got {value!r}")
    return float(value)
