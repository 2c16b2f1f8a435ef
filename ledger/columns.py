"""Column types the ledger's tables share: money, and the usage and cost columns both `calls` and `attempts` carry."""
from __future__ import annotations

import pyarrow as pa

MONEY = "DECIMAL(38, 12)"
ARROW_MONEY = pa.decimal128(38, 12)

# (column, DuckDB type, Arrow type): a call's or a try's tokens, other units and what they cost
USAGE_AND_COST: list[tuple[str, str, pa.DataType]] = [
    ("input_tokens", "BIGINT", pa.int64()),
    ("output_tokens", "BIGINT", pa.int64()),
    ("cache_read_tokens", "BIGINT", pa.int64()),
    ("cache_write_tokens", "BIGINT", pa.int64()),
    ("reasoning_tokens", "BIGINT", pa.int64()),
    ("units", "JSON", pa.string()),
    ("input_cost_usd", MONEY, ARROW_MONEY),
    ("output_cost_usd", MONEY, ARROW_MONEY),
    ("cost_usd", MONEY, ARROW_MONEY),
    ("price_source", "VARCHAR", pa.string()),
]
