"""The whole bill: async media jobs metered to their settlement (model, provider modules, store, poller) and the ledger checked against the providers' own usage and cost reports (reconciliation)."""
