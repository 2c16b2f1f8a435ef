"""Fleet: many sidecars, one budget and one ledger; never imports `sidecar`.

Two halves, each optional: shared budgets on Redis (`fleet.redis`: fleet/redis_*.py, leases of each
account's allowance, see docs/fleet-budgets.md) and the fleet ledger on Postgres (`fleet.postgres`:
fleet/postgres_*.py, every row of every sidecar shipped in batches, see docs/fleet.md).
"""
