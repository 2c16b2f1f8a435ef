"""Budget rules and their accounts: in-memory admission that reserves a call's estimate, and settlement to real spend.

Pure logic, no I/O: the sidecar's guard feeds it calls and the ledger's history, and acts on
what it answers (refusals, threshold crossings). All of it runs on the event loop, so a check
and its reservation happen with nothing in between: concurrent calls cannot overspend.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from .money import non_negative_amount

WINDOWS = ("minute", "hour", "day", "week", "month", "total")
ACTIONS = ("block", "alert")
SPLITS = ("user", "app", "key", "model")
DEFAULT_THRESHOLDS = (Decimal("0.5"), Decimal("0.8"), Decimal("1.0"))
NO_KEY = ""  # the split key of an unsplit rule
_MATCH_KEYS = ("provider", "model", "operation", "app", "user", "key", "tags")
_RULE_KEYS = {"name", "match", "per", "window", "timezone", "limit_usd", "limit_tokens", "limit_requests",
              "action", "thresholds"}


class RuleError(ValueError):
    """A budget rule is malformed; the message names the key."""


@dataclass(frozen=True, slots=True)
class CallAttrs:
    """What rules match on, for one call."""

    provider: str
    model: str
    operation: str
    app: str
    user: str
    key: str
    tags: dict[str, str]


@dataclass(frozen=True, slots=True)
class Match:
    provider: str | None = None
    model: str | None = None  # glob
    operation: str | None = None
    app: str | None = None
    user: str | None = None
    key: str | None = None
    tags: tuple[tuple[str, str], ...] = ()

    def matches(self, c: CallAttrs) -> bool:
        return ((self.provider is None or self.provider == c.provider)
                and (self.operation is None or self.operation == c.operation)
                and (self.app is None or self.app == c.app)
                and (self.user is None or self.user == c.user)
                and (self.key is None or self.key == c.key)
                and all(c.tags.get(k) == v for k, v in self.tags)
                and (self.model is None or fnmatch.fnmatchcase(c.model, self.model)))


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    match: Match
    window: str
    action: str = "block"
    per: str | None = None  # user | app | key | model | tag:NAME
    tz: str | None = None
    limit_usd: Decimal | None = None
    limit_tokens: int | None = None
    limit_requests: int | None = None
    thresholds: tuple[Decimal, ...] = DEFAULT_THRESHOLDS
    source: str = "config"  # or "api"

    def split_key(self, c: CallAttrs) -> str:
        per = self.per
        if per is None:
            return NO_KEY
        if per.startswith("tag:"):
            return c.tags.get(per[4:], "")
        return getattr(c, per)

    def to_doc(self) -> dict[str, Any]:
        m = self.match
        match = {k: getattr(m, k) for k in _MATCH_KEYS[:-1] if getattr(m, k) is not None}
        if m.tags:
            match["tags"] = dict(m.tags)
        doc: dict[str, Any] = {"name": self.name, "match": match, "window": self.window, "action": self.action}
        for key in ("per", "limit_tokens", "limit_requests"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        if self.tz:
            doc["timezone"] = self.tz
        if self.limit_usd is not None:
            doc["limit_usd"] = str(self.limit_usd)
        doc["thresholds"] = [str(t) for t in self.thresholds]
        return doc


def parse_rule(doc: Any, where: str, default_thresholds: tuple[Decimal, ...] = DEFAULT_THRESHOLDS,
               source: str = "config") -> Rule:
    """A rule from config or API JSON; RuleError names the bad key as `where.key`."""
    if not isinstance(doc, dict):
        raise RuleError(f"{where}: expected a mapping")
    unknown = set(doc) - _RULE_KEYS
    if unknown:
        raise RuleError(f"{where}.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(_RULE_KEYS))})")
    name = doc.get("name")
    if not isinstance(name, str) or not name or len(name) > 200:
        raise RuleError(f"{where}.name: required, a non-empty string")
    window = doc.get("window", "month")
    if window not in WINDOWS:
        raise RuleError(f"{where}.window: expected one of {', '.join(WINDOWS)}, got {window!r}")
    action = doc.get("action", "block")
    if action not in ACTIONS:
        raise RuleError(f"{where}.action: expected block or alert, got {action!r}")
    per = doc.get("per")
    if per is not None and per not in SPLITS and not (isinstance(per, str) and per.startswith("tag:") and per[4:]):
        raise RuleError(f"{where}.per: expected one of {', '.join(SPLITS)} or tag:NAME, got {per!r}")
    tz = doc.get("timezone")
    if tz is not None:
        try:
            ZoneInfo(str(tz))
        except (ZoneInfoNotFoundError, ValueError):
            raise RuleError(f"{where}.timezone: unknown time zone {tz!r}") from None
    limit_usd = _decimal(doc.get("limit_usd"), f"{where}.limit_usd")
    limit_tokens = _count(doc.get("limit_tokens"), f"{where}.limit_tokens")
    limit_requests = _count(doc.get("limit_requests"), f"{where}.limit_requests")
    if limit_usd is None and limit_tokens is None and limit_requests is None:
        raise RuleError(f"{where}: give at least one of limit_usd, limit_tokens, limit_requests")
    thresholds = default_thresholds
    if "thresholds" in doc:
        thresholds = parse_thresholds(doc["thresholds"], f"{where}.thresholds")
    return Rule(name=name, match=_match(doc.get("match"), f"{where}.match"), window=window, action=action,
                per=per, tz=str(tz) if tz else None, limit_usd=limit_usd, limit_tokens=limit_tokens,
                limit_requests=limit_requests, thresholds=thresholds, source=source)


def parse_thresholds(value: Any, where: str) -> tuple[Decimal, ...]:
    if not isinstance(value, list) or not value:
        raise RuleError(f"{where}: expected a list of fractions like [0.5, 0.8, 1.0]")
    out = []
    for v in value:
        d = _decimal(v, where)
        if d is None or d <= 0 or d > 10:
            raise RuleError(f"{where}: {v!r} is not a fraction of the limit (0 < t <= 10)")
        out.append(d)
    return tuple(sorted(set(out)))


def _match(doc: Any, where: str) -> Match:
    if doc is None:
        return Match()
    if not isinstance(doc, dict):
        raise RuleError(f"{where}: expected a mapping")
    unknown = set(doc) - set(_MATCH_KEYS)
    if unknown:
        raise RuleError(f"{where}.{sorted(unknown)[0]}: unknown key (known: {', '.join(_MATCH_KEYS)})")
    values: dict[str, Any] = {}
    for key in _MATCH_KEYS[:-1]:
        if key in doc:
            if not isinstance(doc[key], str):
                raise RuleError(f"{where}.{key}: expected a string")
            values[key] = doc[key]
    tags = doc.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise RuleError(f"{where}.tags: expected a mapping of tag names to values")
    return Match(**values, tags=tuple(sorted(tags.items())))


def _decimal(value: Any, where: str) -> Decimal | None:
    if value is None:
        return None
    amount = non_negative_amount(value)
    if amount is None:
        raise RuleError(f"{where}: expected a non-negative number, got {value!r}")
    return amount


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RuleError(f"{where}: expected a whole number >= 0, got {value!r}")
    return value


# --- windows ----------------------------------------------------------------------------------

FOREVER = datetime(9999, 1, 1, tzinfo=timezone.utc)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def window_bounds(window: str, tz: str | None, at: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the calendar window holding `at`, in `tz` (UTC by default)."""
    if window == "total":
        return EPOCH, FOREVER
    local = at.astimezone(ZoneInfo(tz)) if tz else at.astimezone(timezone.utc)
    if window == "minute":
        start = local.replace(second=0, microsecond=0)
        end = start + timedelta(minutes=1)
    elif window == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    else:
        day = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        if window == "week":
            day -= timedelta(days=day.weekday())  # weeks start on Monday
            next_day = day + timedelta(days=7)
        elif window == "month":
            day = day.replace(day=1)
            next_day = (day + timedelta(days=32)).replace(day=1)
        else:
            next_day = day + timedelta(days=1)
        zone = local.tzinfo
        # built from wall-clock dates, so a DST change keeps days at local midnight
        start, end = day.replace(tzinfo=zone), next_day.replace(tzinfo=zone)
        if tz:
            start = start.replace(tzinfo=ZoneInfo(tz))
            end = end.replace(tzinfo=ZoneInfo(tz))
    return start.astimezone(timezone.utc), end.astimezone(timezone.utc)


# --- how amounts read -----------------------------------------------------------------------

def exact(amount: Decimal) -> str:
    """A Decimal as plain digits, exactly, without trailing zeros: 0.0005, not 5E-4 nor 0.000500000000."""
    if not amount:
        return "0"
    return f"{amount.normalize():f}"


def dollars(amount: Decimal) -> str:
    """$1,234.5, $0.0005: exact, for people."""
    if not amount:
        return "$0"
    return f"${amount.normalize():,f}"


def duration(seconds: int | None) -> str:
    """3h 12m, 2d 4h, 45s: a time to a window's reset, for people."""
    if seconds is None:
        return "never"
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{d}d {h}h" if d else f"{h}h {m}m" if h else f"{m}m {s}s" if m else f"{s}s"


# --- accounts ---------------------------------------------------------------------------------

@dataclass(slots=True)
class Tally:
    usd: Decimal = Decimal(0)
    tokens: int = 0
    requests: int = 0

    def add(self, other: Tally, sign: int = 1) -> None:
        self.usd += other.usd * sign
        self.tokens += other.tokens * sign
        self.requests += other.requests * sign


@dataclass(slots=True)
class Account:
    """One rule's allowance for one split key in one window."""

    rule: Rule
    key: str
    start: datetime
    end: datetime
    spent: Tally = field(default_factory=Tally)
    reserved: Tally = field(default_factory=Tally)
    topup_usd: Decimal = Decimal(0)
    fired: set[Decimal] = field(default_factory=set)
    settled_utilization: Decimal = Decimal(0)  # utilization() as of the last settlement
    refused: int = 0  # calls refused in this window (a refusal is not spend)

    @property
    def limit_usd(self) -> Decimal | None:
        r = self.rule.limit_usd
        return None if r is None else r + self.topup_usd

    def would_exceed(self, est: Tally) -> str | None:
        """Which limit this call could pass, counting everything spent and reserved."""
        s, r = self.spent, self.reserved
        limit = self.limit_usd
        if limit is not None and (s.usd + r.usd >= limit or s.usd + r.usd + est.usd > limit):
            return "usd"
        lt = self.rule.limit_tokens
        if lt is not None and (s.tokens + r.tokens >= lt or s.tokens + r.tokens + est.tokens > lt):
            return "tokens"
        lr = self.rule.limit_requests
        if lr is not None and s.requests + r.requests + est.requests > lr:
            return "requests"
        return None

    def utilization(self) -> Decimal:
        """The largest fraction of any limit that is spent (settled spend only)."""
        fractions = [Decimal(0)]
        limit = self.limit_usd
        if limit is not None:
            fractions.append(self.spent.usd / limit if limit else Decimal(1) if self.spent.usd >= 0 else Decimal(0))
        if self.rule.limit_tokens is not None:
            lt = self.rule.limit_tokens
            fractions.append(Decimal(self.spent.tokens) / lt if lt else Decimal(1))
        if self.rule.limit_requests is not None:
            lr = self.rule.limit_requests
            fractions.append(Decimal(self.spent.requests) / lr if lr else Decimal(1))
        return max(fractions)

    def seconds_to_reset(self, now: datetime) -> int | None:
        if self.end >= FOREVER:
            return None
        return max(1, math.ceil((self.end - now).total_seconds()))

    def spend_text(self, kind: str | None = None) -> str:
        """'spent $0.0005 of $0.001 limit' (or tokens, requests): one kind, or every kind the rule limits."""
        parts = []
        s, r = self.spent, self.reserved
        if kind in (None, "usd") and self.limit_usd is not None:
            held = f" (+{dollars(r.usd)} held by calls in flight)" if r.usd else ""
            parts.append(f"spent {dollars(s.usd)}{held} of {dollars(self.limit_usd)} limit")
        if kind in (None, "tokens") and self.rule.limit_tokens is not None:
            held = f" (+{r.tokens:,} held by calls in flight)" if r.tokens else ""
            parts.append(f"spent {s.tokens:,} tokens{held} of {self.rule.limit_tokens:,} tokens limit")
        if kind in (None, "requests") and self.rule.limit_requests is not None:
            held = f" (+{r.requests:,} in flight)" if r.requests else ""
            parts.append(f"made {s.requests:,} requests{held} of {self.rule.limit_requests:,} requests limit")
        return "; ".join(parts)

    def describe(self) -> str:
        """"budget 'x' (day window)", "budget 'x' for user 'alice' (day window)"."""
        return _describe(self.rule.name, self.rule.per, self.key, self.rule.window)


def _describe(rule: str, per: str | None, key: str, window: str) -> str:
    who = f" for {per} {key!r}" if per else ""
    return f"budget {rule!r}{who} ({window} window)"


@dataclass(slots=True)
class Refusal:
    account: Account
    limit: str  # usd | tokens | requests
    retry_after: int | None
    crossings: list[Crossing] = field(default_factory=list)  # thresholds spend reaches, not yet fired
    estimate: Tally = field(default_factory=Tally)  # what this call would have reserved
    basis: str = ""  # how the estimate was made, e.g. "max_tokens 4096 at gpt-4o-mini prices"
    bounded: bool = True  # the estimate is the request's own max tokens, not a guess

    @property
    def message(self) -> str:
        a, e = self.account, self.estimate
        need = (dollars(e.usd) if self.limit == "usd" else f"{e.tokens:,} tokens" if self.limit == "tokens"
                else "1 request")
        how = f" ({self.basis})" if self.basis and self.limit != "requests" else ""
        text = (f"meterline: {a.describe()}: {a.spend_text(self.limit)}; "
                f"this call needs {'up to' if self.bounded else 'about'} {need}{how}")
        return f"{text}; the call was not sent. {self.advice()}"

    def advice(self) -> str:
        a, e = self.account, self.estimate
        options = []
        if self.limit in ("usd", "tokens"):
            options.append("set max_tokens lower" if self.bounded else "set max_tokens to bound it")
        if self.limit == "usd":
            options.append(f"top up (POST /_meterline/budgets/{a.rule.name}/topup)")
        elif self.limit in ("tokens", "requests"):
            options.append(f"raise its limit_{self.limit}")
        too_big = (self.limit == "usd" and a.limit_usd is not None and e.usd > a.limit_usd) or (
            self.limit == "tokens" and a.rule.limit_tokens is not None and e.tokens > a.rule.limit_tokens)
        if self.retry_after is not None and not too_big:  # a new window would not make it fit
            options.append(f"wait {duration(self.retry_after)} for the window to reset")
        lead = "This call alone is more than the whole limit: " if too_big else "To avoid this: "
        return lead + (", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]) + "."


@dataclass(slots=True)
class Reservation:
    holds: list[tuple[Account, Tally]]
    crossings: list[Crossing] = field(default_factory=list)  # alert-only rules already past a limit
    attrs: CallAttrs | None = None  # what the call matched on: a rule replaced meanwhile is matched again
    counted: list[Account] = field(default_factory=list)  # where settlement counted the call
    fleet: Any = None  # with fleet.redis: what the call holds on this holder's leases (fleet/redis_leases.py)


@dataclass(slots=True)
class Crossing:
    """A threshold reached for the first time in an account's window."""

    account: Account
    threshold: Decimal
    utilization: Decimal
    at: datetime


@dataclass(frozen=True, slots=True)
class CrossingNote:
    """A crossing as plain data, its account's numbers taken when it fired: what an alert says and
    what the ledger's alerts row holds. It crosses process boundaries as JSON (to_json/from_json)."""

    rule: str
    per: str | None
    key: str  # "" when the rule has no split key
    window: str
    window_start: datetime
    threshold: Decimal
    utilization: Decimal
    at: datetime
    spent_usd: Decimal
    limit_usd: Decimal | None  # with top-ups
    spent_tokens: int
    limit_tokens: int | None
    requests: int
    limit_requests: int | None
    action: str
    spend_text: str  # Account.spend_text() then, for the log line

    @classmethod
    def of(cls, crossing: Crossing) -> CrossingNote:
        a = crossing.account
        r = a.rule
        return cls(rule=r.name, per=r.per, key=a.key, window=r.window, window_start=a.start,
                   threshold=crossing.threshold, utilization=crossing.utilization, at=crossing.at,
                   spent_usd=a.spent.usd, limit_usd=a.limit_usd, spent_tokens=a.spent.tokens,
                   limit_tokens=r.limit_tokens, requests=a.spent.requests, limit_requests=r.limit_requests,
                   action=r.action, spend_text=a.spend_text())

    def describe(self) -> str:
        return _describe(self.rule, self.per, self.key, self.window)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: amounts and fractions as exact decimal text, times as ISO 8601 with their offset."""
        doc: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            doc[f.name] = (str(value) if isinstance(value, Decimal)
                         else value.isoformat() if isinstance(value, datetime) else value)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any] | str | bytes) -> CrossingNote:
        """The inverse of to_json (a mapping, or its JSON text); ValueError names a missing or bad key."""
        if isinstance(doc, (str, bytes)):
            try:
                doc = orjson.loads(doc)
            except orjson.JSONDecodeError as e:
                raise ValueError(f"crossing note: not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ValueError("crossing note: expected a JSON object")
        values: dict[str, Any] = {}
        for name, (parse, optional) in _NOTE_FIELDS.items():
            if name not in doc:
                raise ValueError(f"crossing note: {name!r} is missing")
            value = doc[name]
            if value is None and optional:
                values[name] = None
                continue
            try:
                values[name] = parse(value)
            except (TypeError, ValueError, ArithmeticError):
                raise ValueError(f"crossing note: {name!r} is not valid: {value!r}") from None
        return cls(**values)


def _note_text(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(v)
    return v


def _note_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(v)
    return v


def _note_decimal(v: Any) -> Decimal:
    if not isinstance(v, str):  # written as text: a float here would not be exact
        raise TypeError(v)
    d = Decimal(v)
    if not d.is_finite():
        raise ValueError(v)
    return d


def _note_time(v: Any) -> datetime:
    t = datetime.fromisoformat(_note_text(v))
    if t.tzinfo is None:
        raise ValueError(v)
    return t


# each field: how it is read back, and whether it may be null
_NOTE_FIELDS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "rule": (_note_text, False), "per": (_note_text, True), "key": (_note_text, False),
    "window": (_note_text, False), "window_start": (_note_time, False), "threshold": (_note_decimal, False),
    "utilization": (_note_decimal, False), "at": (_note_time, False), "spent_usd": (_note_decimal, False),
    "limit_usd": (_note_decimal, True), "spent_tokens": (_note_int, False), "limit_tokens": (_note_int, True),
    "requests": (_note_int, False), "limit_requests": (_note_int, True), "action": (_note_text, False),
    "spend_text": (_note_text, False),
}


class Budgets:
    """All rules and their live accounts. Every method runs on the event loop."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: dict[str, Rule] = {}
        self.accounts: dict[tuple[str, str, datetime], Account] = {}
        self.topups: dict[tuple[str, str], Decimal] = {}
        # rules indexed by one attribute they require, so admission never scans rules that cannot match
        self._index: dict[tuple[str, str], list[Rule]] = {}
        self._open: list[Rule] = []  # rules with no indexable condition
        self._kinds: tuple[str, ...] = ()  # which attributes the index holds rules under
        self._current: dict[tuple[str, str], Account] = {}  # (rule, key) -> account of the latest window
        self.rules = {rule.name: rule for rule in rules}
        self._reindex()

    # --- rules ---------------------------------------------------------------------------------

    def put(self, rule: Rule) -> None:
        """Adds or replaces a rule. A replaced rule starts clean, with no accounts, top-ups or fired
        alerts: its window or match may have changed, so the caller restores what its new definition
        counts from the ledger (`restore(..., only=name)`)."""
        self.rules[rule.name] = rule
        self._reindex()
        self._forget(rule.name)

    def remove(self, name: str) -> bool:
        if self.rules.pop(name, None) is None:
            return False
        self._reindex()
        self._forget(name)
        return True

    def _forget(self, name: str) -> None:
        for k in [k for k in self.accounts if k[0] == name]:
            del self.accounts[k]
        for k in [k for k in self._current if k[0] == name]:
            del self._current[k]
        for k in [k for k in self.topups if k[0] == name]:
            del self.topups[k]

    def _reindex(self) -> None:
        self._index, self._open = {}, []
        for rule in self.rules.values():
            key = _index_key(rule.match)
            if key is None:
                self._open.append(rule)
            else:
                self._index.setdefault(key, []).append(rule)
        self._kinds = tuple({kind for kind, _ in self._index})

    def matching(self, c: CallAttrs) -> list[Rule]:
        found = [r for r in self._open if r.match.matches(c)]
        index = self._index
        for kind in self._kinds:
            if kind == "tag":
                for k, v in c.tags.items():
                    found += [r for r in index.get(("tag", f"{k}={v}"), ()) if r.match.matches(c)]
            else:
                found += [r for r in index.get((kind, getattr(c, kind)), ()) if r.match.matches(c)]
        return found

    # --- the request path ----------------------------------------------------------------------

    def account(self, rule: Rule, key: str, at: datetime) -> Account:
        current = self._current.get((rule.name, key))
        if current is not None and current.start <= at < current.end:
            return current
        start, end = window_bounds(rule.window, rule.tz, at)
        k = (rule.name, key, start)
        acct = self.accounts.get(k)
        if acct is None:
            acct = self.accounts[k] = Account(rule, key, start, end,
                                              topup_usd=self.topups.get((rule.name, key), Decimal(0)))
        if current is None or start >= current.start:
            self._current[(rule.name, key)] = acct
        return acct

    def admit(self, c: CallAttrs, at: datetime, estimate: Callable[[list[Rule]], Tally]) -> Reservation | Refusal:
        """Reserves the call's estimate on every matching account, or refuses it. A refusal is
        counted on its account; it is not spend, so it fires only thresholds that spend already
        reaches but that no settlement has checked (a zero limit, a rule added with past spend)."""
        rules = self.matching(c)
        if not rules:
            return Reservation([])
        est = estimate(rules)
        holds = [(self.account(r, r.split_key(c), at), est) for r in rules]
        for acct, e in holds:
            if acct.rule.action == "block":
                limit = acct.would_exceed(e)
                if limit is not None:
                    acct.refused += 1
                    return Refusal(acct, limit, acct.seconds_to_reset(at), self._crossed(acct, at), estimate=e)
        for acct, e in holds:
            acct.reserved.add(e)
        return Reservation(holds, attrs=c)

    def settle(self, reservation: Reservation, actual: Tally, at: datetime) -> list[Crossing]:
        """Replaces the reservations with what the call really cost; returns thresholds newly reached.
        A call whose rule was replaced while it ran counts where the new definition puts it (if it
        matches), so none of its spend goes to an account that no longer exists."""
        crossings: list[Crossing] = []
        reservation.counted = counted = []
        for acct, est in reservation.holds:
            acct.reserved.add(est, -1)
            rule = self.rules.get(acct.rule.name)
            if rule is not acct.rule:
                c = reservation.attrs
                if rule is None or c is None or not rule.match.matches(c):
                    continue
                acct = self.account(rule, rule.split_key(c), at)
            acct.spent.add(actual)
            counted.append(acct)
            crossings += self._crossed(acct, at)
        return crossings

    def _crossed(self, acct: Account, at: datetime) -> list[Crossing]:
        util = acct.settled_utilization = acct.utilization()
        out = []
        for t in acct.rule.thresholds:
            if util >= t and t not in acct.fired:
                acct.fired.add(t)
                out.append(Crossing(acct, t, util, at))
        return out

    # --- history -------------------------------------------------------------------------------

    def restore(self, c: CallAttrs, window_start: datetime, spent: Tally, only: str | None = None) -> None:
        """Counts past spend (from the ledger, since `window_start`) into the accounts of the rules
        whose current window starts there."""
        for rule in self.matching(c):
            if only is not None and rule.name != only:
                continue
            start, _ = window_bounds(rule.window, rule.tz, window_start)
            if start == window_start:
                self.account(rule, rule.split_key(c), window_start).spent.add(spent)

    def restore_fired(self, rule_name: str, key: str, window_start: datetime, threshold: Decimal) -> None:
        rule = self.rules.get(rule_name)
        if rule is not None:
            self.account(rule, key, window_start).fired.add(threshold)

    def topup(self, name: str, key: str, amount: Decimal) -> Account:
        rule = self.rules[name]
        self.topups[(name, key)] = self.topups.get((name, key), Decimal(0)) + amount
        acct = self.account(rule, key, EPOCH if rule.window == "total" else datetime.now(timezone.utc))
        acct.topup_usd = self.topups[(name, key)]
        return acct

    def window_starts(self, now: datetime, only: str | None = None) -> set[datetime]:
        """The distinct starts of the rules' current windows: one ledger scan each rebuilds them all."""
        return {window_bounds(r.window, r.tz, now)[0] for r in self.rules.values() if only in (None, r.name)}

    def prune(self, now: datetime) -> None:
        """Forgets accounts of windows that ended and hold no reservation."""
        for k, acct in list(self.accounts.items()):
            if acct.end <= now and acct.reserved.requests == 0:
                del self.accounts[k]
                if self._current.get(k[:2]) is acct:
                    del self._current[k[:2]]

    def status(self, now: datetime) -> list[dict[str, Any]]:
        out = []
        for rule in self.rules.values():
            current = [a for a in self.accounts.values() if a.rule.name == rule.name and a.start <= now < a.end]
            placeholder = not current and rule.per is not None
            if not current:
                # a split rule before its first call shows as one row with no key and nothing spent
                current = [self.account(rule, NO_KEY, now) if rule.per is None
                           else Account(rule, NO_KEY, *window_bounds(rule.window, rule.tz, now))]
            for a in sorted(current, key=lambda a: a.key):
                out.append({
                    "rule": rule.name, "key": a.key if rule.per and not placeholder else None, "per": rule.per,
                    "window": rule.window, "action": rule.action,
                    "window_start": a.start.isoformat(),
                    "resets_at": None if a.end >= FOREVER else a.end.isoformat(),
                    "seconds_to_reset": a.seconds_to_reset(now),
                    "spent_usd": exact(a.spent.usd), "reserved_usd": exact(a.reserved.usd),
                    "limit_usd": None if a.limit_usd is None else exact(a.limit_usd),
                    "spent_tokens": a.spent.tokens, "limit_tokens": rule.limit_tokens,
                    "requests": a.spent.requests, "limit_requests": rule.limit_requests,
                    "utilization": float(a.utilization()),
                    "alerts_fired": [exact(t) for t in sorted(a.fired)], "refused": a.refused,
                    "source": rule.source,
                })
        return out


def _index_key(m: Match) -> tuple[str, str] | None:
    for name in ("user", "key", "app"):
        value = getattr(m, name)
        if value is not None:
            return (name, value)
    if m.tags:
        k, v = m.tags[0]
        return ("tag", f"{k}={v}")
    if m.model is not None and not any(ch in m.model for ch in "*?["):
        return ("model", m.model)
    for name in ("operation", "provider"):
        value = getattr(m, name)
        if value is not None:
            return (name, value)
    return None

