"""Pricing: the flat fast path equals genai-prices' own calculation across the catalogue; config rules; unknowns stay NULL."""
from __future__ import annotations

import random
from datetime import datetime, timezone
from decimal import Decimal

import genai_prices
from genai_prices import data_snapshot

from ledger.pricing import QUANTUM, Flat, Pricer, PriceRule, catalog_usage
from ledger.records import Usage

NOW = datetime.now(timezone.utc)


def reference(provider: str, model: str, usage: Usage) -> tuple[Decimal, Decimal] | None:
    try:
        calc = genai_prices.calc_price(catalog_usage(usage), model, provider_id=provider, genai_request_timestamp=NOW)
    except LookupError:
        return None
    # whatever genai-prices files under neither input nor output counts as input (ledger/pricing.py)
    return (calc.total_price - calc.output_price).quantize(QUANTUM), calc.output_price.quantize(QUANTUM)


def test_fast_path_equals_genai_prices_for_every_catalogue_model():
    rng = random.Random(3)
    checked = fast = 0
    for provider in data_snapshot.get_snapshot().providers:
        if provider.id not in ("openai", "anthropic", "google", "groq", "mistral", "deepseek"):
            continue
        for model in provider.models:
            pricer = Pricer()
            for _ in range(4):
                inp = rng.randint(0, 300_000)
                read = rng.randint(0, inp // 2)
                write = rng.randint(0, (inp - read) // 2)
                out = rng.randint(0, 50_000)
                usage = Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=read,
                              cache_write_tokens=write, reasoning_tokens=rng.randint(0, out))
                want = reference(provider.id, model.id, usage)
                got = pricer.cost(provider.id, (model.id,), usage, NOW)
                if want is None:
                    assert got.total_usd is None or got.source == "unpriced"
                    continue
                assert (got.input_usd, got.output_usd) == want, (provider.id, model.id, usage)
                assert got.total_usd == want[0] + want[1]
                checked += 1
            fast += isinstance(pricer._flat.get((provider.id, model.id)), Flat)
    assert checked > 200 and fast > 50, (checked, fast)


def test_unknown_model_is_unpriced_never_zero():
    cost = Pricer().cost("openai", ("no-such-model-xyz",), Usage(input_tokens=10, output_tokens=5), NOW)
    assert cost.total_usd is None and cost.source == "unpriced"


def test_config_rule_wins_and_prices_cache_and_images():
    pricer = Pricer([PriceRule(provider="vllm", model="llama-*", input_per_mtok=Decimal("0.10"),
                               output_per_mtok=Decimal("0.20"), cache_read_per_mtok=Decimal("0.01")),
                     PriceRule(provider="openai", model="dall-e-3", per_image=Decimal("0.04"))])
    cost = pricer.cost("vllm", ("llama-3.1-8b",), Usage(input_tokens=1_000_000, output_tokens=500_000,
                                                         cache_read_tokens=400_000), NOW)
    assert cost.source == "config"
    assert cost.input_usd == Decimal("0.064") and cost.output_usd == Decimal("0.1")
    images = pricer.cost("openai", ("dall-e-3",), Usage(units={"images": 3}), NOW)
    assert images.total_usd == Decimal("0.12")


def test_a_service_tier_is_priced_as_such():
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    pricer = Pricer()
    standard = pricer.cost("openai", ("gpt-4o-mini",), usage, NOW, "default")
    priority = pricer.cost("openai", ("gpt-4o-mini",), usage, NOW, "priority")
    calc = genai_prices.calc_price(catalog_usage(usage), "gpt-4o-mini", provider_id="openai",
                                   genai_request_timestamp=NOW, price_context={"service_tier": "priority"})
    assert priority.total_usd == calc.total_price.quantize(QUANTUM)
    assert priority.total_usd > standard.total_usd
