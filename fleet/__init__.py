"""The fleet: many sidecars sharing one budget (Redis) and one ledger (Postgres); never imports `sidecar`."""
