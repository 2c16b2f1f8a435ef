"""Money as Decimal: amounts from config files and JSON, parsed without binary floating-point noise."""
from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any


def non_negative_amount(value: Any) -> Decimal | None:
    """The amount `value` states (a number or numeric string), or None when it is not a finite
    amount >= 0. str() first: YAML and JSON give floats, and Decimal(0.1) is not 0.1."""
    if isinstance(value, bool):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    return amount if amount.is_finite() and amount >= 0 else None
