"""What a call cost, in Decimal USD: genai-prices' catalogue at the call's time, under the config's overrides."""
from __future__ import annotations

import fnmatch
import logging
from collections import deque
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

import genai_prices
import genai_prices.types

from .records import Usage

log = logging.getLogger("meterline.pricing")

MTOK = Decimal(1_000_000)
# the ledger's DECIMAL(38, 12): amounts are rounded to a trillionth of a dollar, once, here
QUANTUM = Decimal("0.000000000001")
CATALOG_SOURCE = f"genai-prices {genai_prices.__version__}"
UNPRICED = "unpriced"
FREE = "free"

# units of ours that genai-prices does not know; they are priced only by config rules
_OWN_UNITS = frozenset({"images", "counted_tokens", "requests"})


@dataclass(frozen=True, slots=True)
class PriceRule:
    """A config `prices:` entry: per-million-token rates, per image, per second of audio."""

    provider: str | None
    model: str  # glob
    input_per_mtok: Decimal | None = None
    output_per_mtok: Decimal | None = None
    cache_read_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None
    per_image: Decimal | None = None
    per_second: Decimal | None = None
    # a job's resolution (e.g. "1080p") -> its own per_second / per_image rates
    by_resolution: tuple[tuple[str, Decimal | None, Decimal | None], ...] = ()

    def matches(self, provider: str, model: str) -> bool:
        return (self.provider is None or self.provider == provider) and fnmatch.fnmatchcase(model, self.model)


@dataclass(frozen=True, slots=True)
class Cost:
    input_usd: Decimal | None
    output_usd: Decimal | None
    total_usd: Decimal | None
    source: str
    calc: object = None  # genai-prices' PriceCalculation, when it computed this

    @classmethod
    def unpriced(cls) -> Cost:
        return cls(None, None, None, UNPRICED)


FREE_COST = Cost(Decimal(0), Decimal(0), Decimal(0), FREE)


class Pricer:
    """Prices calls; config rules win over the catalogue, the first matching rule wins."""

    def __init__(self, rules: list[PriceRule] | None = None, default_max_output: int = 32_768) -> None:
        self.rules = list(rules or ())
        self.default_max_output = default_max_output
        self._rates: dict[tuple[str, str, date], Rates | None] = {}
        # (provider, model) -> the catalogue's flat per-token prices, None when they are not flat,
        # or UNKNOWN when the catalogue has no such model (so it is not looked up on every call)
        self._flat: dict[tuple[str, str], Flat | None | object] = {}
        self._batch: dict[tuple[str, str, date], bool] = {}  # whether the catalogue has batch prices

    def worst_case(self, provider: str, model: str | None, input_tokens: int, max_output: int | None,
                   at: datetime) -> tuple[Decimal | None, int]:
        """An upper bound of a call's cost before it is sent (at the model's highest-tier prices),
        and the output tokens it assumes: `max_output`, else `output_ceiling`."""
        rates = self.rates(provider, model, at)
        if max_output is None:
            max_output = self._ceiling(rates, input_tokens)
        if rates is None:
            return None, max_output
        return rates.input_per_token * input_tokens + rates.output_per_token * max_output, max_output

    def output_ceiling(self, provider: str, model: str | None, input_tokens: int, at: datetime) -> int:
        """The most a call without max tokens can produce: what the model's context window leaves
        after the input, or `default_max_output` when the window is unknown."""
        return self._ceiling(self.rates(provider, model, at), input_tokens)

    def _ceiling(self, rates: Rates | None, input_tokens: int) -> int:
        window = rates.context_window if rates else None
        return max(window - input_tokens, 0) if window else self.default_max_output

    def rates(self, provider: str, model: str | None, at: datetime) -> Rates | None:
        """The model's upper-bound per-token prices (cached per day: one dict lookup after the first)."""
        if not model:
            return None
        k = (provider, model, at.date())
        rates = self._rates.get(k, _UNSEEN)
        if rates is _UNSEEN:
            rates = self._rates[k] = _rates(provider, model, self.rules, at)
        return rates  # type: ignore[return-value]

    def warm(self) -> None:
        """Loads the catalogue now, so the first call does not pay for it."""
        try:
            genai_prices.calc_price(genai_prices.Usage(input_tokens=1, output_tokens=1), "gpt-4o-mini",
                                    provider_id="openai")
        except Exception:  # noqa: BLE001 - a broken catalogue shows up as unpriced calls
            log.warning("genai-prices catalogue failed to load", exc_info=True)

    def cost(self, provider: str, models: tuple[str | None, ...], usage: Usage, at: datetime,
             service_tier: str | None = None) -> Cost:
        """`models` in order of preference (the response's model, then the request's). A service tier
        other than the standard one (OpenAI's flex or priority, Anthropic's priority, batch) is priced
        as such where the catalogue knows its prices."""
        context = {"service_tier": service_tier} if service_tier and service_tier not in _STANDARD_TIERS else None
        names = [m for m in models if m]
        if not names or usage.is_empty():
            return Cost.unpriced()
        for name in names:
            for rule in self.rules:
                if rule.matches(provider, name):
                    return _rule_cost(rule, usage)
        for name in names:
            flat = self._flat.get((provider, name), _UNSEEN)
            if flat is UNKNOWN:
                continue
            if isinstance(flat, Flat) and context is None and flat.fits(usage):
                return flat.cost(usage)
            cost = _catalog_cost(provider, name, usage, at, context)
            if flat is _UNSEEN:
                self._flat[(provider, name)] = _flat_of(cost)
            if cost is not None:
                return cost
        return Cost.unpriced()


    # --- async jobs (jobs/) --------------------------------------------------------------------

    def units_cost(self, provider: str, model: str | None, units: dict, at: datetime) -> Decimal | None:
        """A job's cost from its units (seconds, images, resolution) at the config's per_second /
        per_image rates (per resolution where the rule gives them). genai-prices has no per-second
        or per-image prices of video and image jobs, so without a rule the answer is None."""
        if not model:
            return None
        for rule in self.rules:
            if rule.matches(provider, model):
                per_second, per_image = rule.per_second, rule.per_image
                resolution = units.get("resolution")
                for name, second, image in rule.by_resolution:
                    if resolution is not None and str(resolution) == name:
                        per_second = second if second is not None else per_second
                        per_image = image if image is not None else per_image
                total, priced = Decimal(0), False
                if per_second is not None and units.get("seconds") is not None:
                    total += Decimal(str(units["seconds"])) * per_second
                    priced = True
                if per_image is not None and units.get("images") is not None:
                    total += Decimal(str(units["images"])) * per_image
                    priced = True
                return _q(total) if priced else None
        return None

    def batch_cost(self, provider: str, model: str | None, usage: Usage, at: datetime) -> Cost:
        """One batch request's cost at batch rates: genai-prices' batch prices where it has them,
        else the config's `prices:` rule for the model (taken to be the batch rate), else unpriced
        (never the standard rate: that would bill a batch at twice its price)."""
        if not model or usage.is_empty():
            return Cost.unpriced()
        key = (provider, model, at.date())
        has = self._batch.get(key)
        if has is None:
            has = self._batch[key] = _has_batch_price(provider, model, at)
        if has:
            cost = _catalog_cost(provider, model, usage, at, {"processing": "batch"})
            if cost is not None:
                return Cost(cost.input_usd, cost.output_usd, cost.total_usd, cost.source + " batch", cost.calc)
        for rule in self.rules:
            if rule.matches(provider, model):
                return _rule_cost(rule, usage)
        return Cost.unpriced()


def _has_batch_price(provider: str, model: str, at: datetime) -> bool:
    """Whether genai-prices prices this model's batch requests differently from its standard ones."""
    probe = genai_prices.Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    try:
        standard = genai_prices.calc_price(probe, model, provider_id=provider, genai_request_timestamp=at)
        batch = genai_prices.calc_price(probe, model, provider_id=provider, genai_request_timestamp=at,
                                        price_context={"processing": "batch"})
    except Exception:  # noqa: BLE001 - not in the catalogue
        return False
    return batch.total_price != standard.total_price


# --- what a call without max tokens will likely produce ------------------------------------------

FIRST_CALL_OUTPUT = 1024  # output tokens assumed before a (provider, model, app) has any history
MIN_LIKELY_OUTPUT = 64  # never assume less than this, however short the recent answers were
RECENT_CALLS = 16  # the likely output is the largest of this many recent answers


class RecentOutput:
    """Output tokens of the last few calls per (provider, model, app), in memory on the event loop.

    `likely` is one dict lookup: the largest of the last RECENT_CALLS answers, kept up to date
    by `record` (a max over 16 ints, once per call). At most `max_keys` keys are kept (apps and
    models are free text from the caller); the oldest is forgotten first.
    """

    def __init__(self, size: int = RECENT_CALLS, max_keys: int = 10_000) -> None:
        self.size = size
        self.max_keys = max_keys
        self._recent: dict[tuple[str, str, str], deque[int]] = {}
        self._likely: dict[tuple[str, str, str], int] = {}

    def likely(self, key: tuple[str, str, str]) -> int | None:
        return self._likely.get(key)

    def record(self, key: tuple[str, str, str], output_tokens: int) -> None:
        recent = self._recent.get(key)
        if recent is None:
            if len(self._recent) >= self.max_keys:
                oldest = next(iter(self._recent))
                del self._recent[oldest], self._likely[oldest]
            recent = self._recent[key] = deque(maxlen=self.size)
        recent.append(output_tokens)
        self._likely[key] = max(recent)


_STANDARD_TIERS = frozenset({"default", "standard", "auto"})
UNKNOWN = object()
_UNSEEN = object()
_FLAT = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
# prices that apply only to usage carried in `units` (audio, images, 1h cache writes, searches...)
_UNIT_PRICED = ("audio", "image", "video", "_1h_", "_5m_", "kcount", "characters", "pages", "pixels",
                "seconds", "tool", "citation", "messages")


@dataclass(frozen=True, slots=True)
class Flat:
    """A catalogue price that is the same for every token of a kind (no tiers, no conditions).

    For such a model and usage with no other units, cost is arithmetic on four rates, the same
    arithmetic genai-prices does (tests/test_pricing.py checks them equal over the catalogue),
    at a fraction of its cost per call.
    """

    input: Decimal
    output: Decimal
    cache_read: Decimal | None
    cache_write: Decimal | None
    source: str

    def fits(self, usage: Usage) -> bool:
        return (not usage.units and (not usage.cache_read_tokens or self.cache_read is not None)
                and (not usage.cache_write_tokens or self.cache_write is not None))

    def cost(self, usage: Usage) -> Cost:
        read = usage.cache_read_tokens or 0
        write = usage.cache_write_tokens or 0
        leaf = (usage.input_tokens or 0) - read - write
        if leaf < 0:
            return Cost.unpriced()  # inconsistent counts: genai-prices refuses them too
        input_usd = Decimal(leaf) * self.input
        if read:
            input_usd += Decimal(read) * self.cache_read
        if write:
            input_usd += Decimal(write) * self.cache_write
        input_usd = _q(input_usd / MTOK)
        output_usd = _q(Decimal(usage.output_tokens or 0) * self.output / MTOK)
        return Cost(input_usd, output_usd, input_usd + output_usd, self.source)


def _flat_of(cost: Cost | None) -> Flat | None | object:
    if cost is None:
        return UNKNOWN
    calc = cost.calc
    model = calc.model
    if not isinstance(model.prices, genai_prices.types.ModelPrice):
        return None  # prices that change with time
    # (price variants apply only with a service tier, which never takes this path)
    fields = {k: v for k, v in calc.model_price.__dict__.items() if v is not None and not k.startswith("_")}
    if not all(isinstance(v, Decimal) for v in fields.values()):
        return None  # tiered
    if any(k not in _FLAT and not any(u in k for u in _UNIT_PRICED) for k in fields):
        return None  # a price of plain tokens this fast path does not know (e.g. reasoning)
    if "input_mtok" not in fields or "output_mtok" not in fields:
        return None
    return Flat(fields["input_mtok"], fields["output_mtok"], fields.get("cache_read_mtok"),
                fields.get("cache_write_mtok"), CATALOG_SOURCE)


@dataclass(frozen=True, slots=True)
class Rates:
    """Upper bounds of a model's per-token prices, for reserving a call's worst case."""

    input_per_token: Decimal
    output_per_token: Decimal
    context_window: int | None


def _rates(provider: str, model: str, rules: list[PriceRule], at: datetime) -> Rates | None:
    for rule in rules:
        if rule.matches(provider, model):
            return Rates((rule.input_per_mtok or Decimal(0)) / MTOK, (rule.output_per_mtok or Decimal(0)) / MTOK, None)
    # priced at a million tokens of each, so the highest tier is the one that counts
    try:
        inp = genai_prices.calc_price(genai_prices.Usage(input_tokens=1_000_000, output_tokens=0), model,
                                      provider_id=provider, genai_request_timestamp=at)
        both = genai_prices.calc_price(genai_prices.Usage(input_tokens=1_000_000, output_tokens=1_000_000), model,
                                       provider_id=provider, genai_request_timestamp=at)
    except Exception:  # noqa: BLE001 - unknown model: no USD reservation is possible
        return None
    return Rates(inp.total_price / MTOK, (both.total_price - inp.total_price) / MTOK, inp.model.context_window)


def _q(amount: Decimal) -> Decimal:
    return amount.quantize(QUANTUM)


def _rule_cost(rule: PriceRule, usage: Usage) -> Cost:
    input_tokens = usage.input_tokens or 0
    cache_read = usage.cache_read_tokens or 0
    cache_write = usage.cache_write_tokens or 0
    input_rate = rule.input_per_mtok or Decimal(0)
    input_usd = (
        Decimal(input_tokens - cache_read - cache_write) * input_rate
        + Decimal(cache_read) * (rule.cache_read_per_mtok if rule.cache_read_per_mtok is not None else input_rate)
        + Decimal(cache_write) * (rule.cache_write_per_mtok if rule.cache_write_per_mtok is not None else input_rate)
    ) / MTOK
    output_usd = Decimal(usage.output_tokens or 0) * (rule.output_per_mtok or Decimal(0)) / MTOK
    if rule.per_image is not None:
        output_usd += Decimal(usage.units.get("images", 0)) * rule.per_image
    if rule.per_second is not None:
        input_usd += Decimal(str(usage.units.get("audio_seconds", 0))) * rule.per_second
    return Cost(_q(input_usd), _q(output_usd), _q(input_usd) + _q(output_usd), "config")


def catalog_usage(usage: Usage) -> genai_prices.Usage:
    """Our Usage in genai-prices' terms (the same convention, so only names differ)."""
    values: dict[str, int | float] = {}
    for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"):
        value = getattr(usage, name)
        if value is not None:
            values[name] = value
    if usage.reasoning_tokens:
        values["output_reasoning_tokens"] = usage.reasoning_tokens
    for name, value in usage.units.items():
        if name not in _OWN_UNITS:
            values[name] = value
    return genai_prices.Usage(**values)


def _catalog_cost(provider: str, model: str, usage: Usage, at: datetime,
                  context: dict[str, str] | None = None) -> Cost | None:
    try:
        calc = genai_prices.calc_price(catalog_usage(usage), model, provider_id=provider,
                                       genai_request_timestamp=at, price_context=context)
    except LookupError:
        return None
    except Exception:  # noqa: BLE001 - e.g. inconsistent counts; the call stays unpriced, not zero
        log.warning("genai-prices could not price %s/%s", provider, model, exc_info=True)
        return None
    input_price = calc.input_price
    # a priced unit genai-prices files under neither input nor output (e.g. bare `audio_seconds`)
    # still costs: count it as input rather than drop it, so cost_usd is never short
    input_price += calc.total_price - calc.input_price - calc.output_price
    return Cost(_q(input_price), _q(calc.output_price),
                _q(input_price) + _q(calc.output_price), CATALOG_SOURCE, calc)
