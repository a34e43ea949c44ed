"""The lifecycle of a call (exchange.py) and the pure checks it runs: PEP, usage, request fields."""
