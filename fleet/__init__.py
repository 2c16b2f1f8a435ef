"""Fleet: many sidecars, one budget and one ledger.

Two halves, each optional: shared budgets on Redis (`fleet.redis`: fleet/redis_*.py, leases of each
account's allowance, see docs/fleet-budgets.md) and the fleet ledger on Postgres (`fleet.postgres`:
every row of every sidecar shipped in batches, see docs/fleet.md).
"""
