"""Shipped policy plugins, registered as entry points in pyproject.toml; see gateway/plugins.py."""
