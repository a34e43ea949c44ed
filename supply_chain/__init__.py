"""Checks on the locked dependencies: hashes, known-bad versions, pip-audit (README: Supply chain)."""
