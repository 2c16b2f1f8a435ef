"""The sinks process: everything a call's record feeds once the call is over (ledger, telemetry, alerts, SQL)."""
