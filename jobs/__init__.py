"""The whole bill: checks the ledger against the providers' own usage and cost reports (reconciliation)."""
