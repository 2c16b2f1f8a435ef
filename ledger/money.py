"""Money as Decimal: amounts from config files and JSON, parsed without binary floating-point noise."""
from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any


# the ledger's money columns are DECIMAL(38, 12): 26 digits before the point
MONEY_DIGITS = 26
MAX_AMOUNT_TEXT = "10^26"


def non_negative_amount(value: Any) -> Decimal | None:
    """The amount `value` states (a number or numeric string), or None when it is not a finite
    amount >= 0 that the ledger's DECIMAL(38, 12) columns hold (below 10^26: a limit or price of
    1e300 would make every write of it fail). str() first: YAML and JSON give floats, and
    Decimal(0.1) is not 0.1."""
    if isinstance(value, bool):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    return amount if amount.is_finite() and amount >= 0 and amount.adjusted() < MONEY_DIGITS else None
