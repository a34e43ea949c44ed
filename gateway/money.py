"""Money is integer nano-dollars (1 USD = 10**9) everywhere: Redis, journal, API, headers.

Floats appear only where operators type prices and budgets; they are converted here,
once, through Decimal so 0.1 stays 0.1.
"""

from __future__ import annotations

from decimal import Decimal

NANOS_PER_USD = 1_000_000_000
TOKENS_PER_MTOK = 1_000_000


def usd_to_nanos(usd: float | int | str | Decimal) -> int:
    return int((Decimal(str(usd)) * NANOS_PER_USD).to_integral_value())


def nanos_to_usd_str(nanos: int) -> str:
    """Exact decimal string for headers and reports, e.g. 1500 -> "0.000001500"."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def cost_nanos(tokens: int, nanos_per_mtok: int) -> int:
    """Price of `tokens` at a per-million-token price, rounded up so we never under-charge."""
    return -(-tokens * nanos_per_mtok // TOKENS_PER_MTOK)
