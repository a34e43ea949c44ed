"""Price freezing: the operator's settings price, else litellm's bundled price map.

litellm's JSON is read from its package directory without importing litellm (importing
it costs seconds and a lot of memory), once per process, on first use.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from gateway.assembly.model import FrozenPrice
from gateway.money import NANOS_PER_USD, TOKENS_PER_MTOK
from gateway.price_map import candidates, price_map
from gateway.settings import ModelSettings

__all__ = ["MAX_NANOS_PER_MTOK", "freeze_price", "litellm_price", "price_from_usd_per_mtok"]

# $1M per million tokens: anything above is a typo, and would overflow 64-bit budgets.
MAX_NANOS_PER_MTOK = 10**15


def _nanos_per_mtok(usd_per_mtok: Decimal) -> int:
    # Rounded up: a frozen price may only ever over-estimate, never under-charge.
    return int((usd_per_mtok * NANOS_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        # str() first: the shortest repr of a float, so 1.5e-07 stays exactly 1.5e-07.
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() and number >= 0 else None


def price_from_usd_per_mtok(input_usd: float | Decimal, output_usd: float | Decimal) -> FrozenPrice:
    return FrozenPrice(
        input_nanos_per_mtok=_nanos_per_mtok(Decimal(str(input_usd))),
        output_nanos_per_mtok=_nanos_per_mtok(Decimal(str(output_usd))),
        source="settings",
    )


def _entry_price(entry: Any, source: str) -> FrozenPrice | None:
    if not isinstance(entry, dict):
        return None
    per_input = _decimal(entry.get("input_cost_per_token"))
    per_output = _decimal(entry.get("output_cost_per_token"))
    if per_output is None and entry.get("mode") == "embedding":
        per_output = Decimal(0)  # embeddings produce no output tokens
    if per_input is None or per_output is None:
        return None
    return FrozenPrice(
        input_nanos_per_mtok=_nanos_per_mtok(per_input * TOKENS_PER_MTOK),
        output_nanos_per_mtok=_nanos_per_mtok(per_output * TOKENS_PER_MTOK),
        source=source,
    )


def litellm_price(*names: str) -> FrozenPrice | None:
    """The first of `names` litellm prices, also trying lower-case and no "provider/" prefix."""
    loaded = price_map()
    if loaded is None:
        return None
    source, entries = loaded
    for candidate in candidates(names):
        price = _entry_price(entries.get(candidate), source)
        if price is not None:
            return price
    return None


def freeze_price(model: ModelSettings) -> FrozenPrice | None:
    """The price an Assembly freezes for `model`; None when neither settings nor litellm know it."""
    if model.price is not None:
        return price_from_usd_per_mtok(model.price.input_per_mtok, model.price.output_per_mtok)
    return litellm_price(model.target, model.name)
