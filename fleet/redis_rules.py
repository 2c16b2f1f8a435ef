"""Budget rules added through the API and top-ups, shared through Redis: stored there, and a version counter every holder polls.

`meterline:rules` maps a rule's name to its JSON (Rule.to_doc); `meterline:topups` maps
"rule<US>key" to its top-ups' sum in micro-dollars; `meterline:rules:version` goes up on every
change. A holder reads the version each sync round (`fleet.sync_ms`) and the two hashes when it
moved, so a change made through any sidecar holds on every one within a round or two.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
import redis.asyncio as aioredis

from ledger.budgets import Rule, RuleError, parse_rule

from .redis_leases import MICRO, PREFIX

RULES = PREFIX + "rules"
TOPUPS = PREFIX + "topups"
VERSION = PREFIX + "rules:version"
SEP = "\x1f"


@dataclass(frozen=True, slots=True)
class Shared:
    """What the fleet shares: its API rules and its top-ups (exact USD)."""

    version: int
    rules: dict[str, Rule]
    topups: dict[tuple[str, str], Decimal]


async def put_rule(client: aioredis.Redis, rule: Rule) -> None:
    """Adds or replaces an API rule; a replaced rule starts with no top-ups, as in Budgets.put."""
    stale = [f for f in await client.hkeys(TOPUPS) if f.decode().partition(SEP)[0] == rule.name]
    pipe = client.pipeline(transaction=True)
    pipe.hset(RULES, rule.name, orjson.dumps(rule.to_doc()))
    if stale:
        pipe.hdel(TOPUPS, *stale)
    pipe.incr(VERSION)
    await pipe.execute()


async def remove_rule(client: aioredis.Redis, name: str) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.hdel(RULES, name)
    pipe.incr(VERSION)
    await pipe.execute()


async def topup(client: aioredis.Redis, name: str, key: str, amount: Decimal) -> None:
    """Adds a top-up. Stored in micro-dollars rounded down: the fleet never lends more than was given."""
    pipe = client.pipeline(transaction=True)
    pipe.hincrby(TOPUPS, f"{name}{SEP}{key}", int(amount * MICRO))
    pipe.incr(VERSION)
    await pipe.execute()


async def restore(client: aioredis.Redis, rules: list[Rule], topups: dict[tuple[str, str], Decimal]) -> None:
    """Puts a sidecar's API rules and top-ups into a Redis that has none (new, or restarted without
    persistence). HSETNX: when several sidecars do it at once the first of each wins, none adds twice."""
    pipe = client.pipeline(transaction=True)
    for rule in rules:
        pipe.hsetnx(RULES, rule.name, orjson.dumps(rule.to_doc()))
    for (name, key), amount in topups.items():
        pipe.hsetnx(TOPUPS, f"{name}{SEP}{key}", int(amount * MICRO))
    pipe.incr(VERSION)
    await pipe.execute()


async def version(client: aioredis.Redis) -> int:
    return int(await client.get(VERSION) or 0)


async def load(client: aioredis.Redis, thresholds: Any) -> Shared:
    pipe = client.pipeline(transaction=True)
    pipe.get(VERSION)
    pipe.hgetall(RULES)
    pipe.hgetall(TOPUPS)
    ver, rules_raw, topups_raw = await pipe.execute()
    rules: dict[str, Rule] = {}
    for name, doc in rules_raw.items():
        try:
            rule = parse_rule(orjson.loads(doc), f"fleet rule {name.decode(errors='replace')!r}", thresholds,
                              source="api")
        except (RuleError, ValueError):
            continue  # written by another version of meterline: skipped, not fatal
        rules[rule.name] = rule
    topups = {}
    for field_, value in topups_raw.items():
        name, _, key = field_.decode().partition(SEP)
        topups[(name, key)] = Decimal(int(value)) / MICRO
    return Shared(int(ver or 0), rules, topups)
