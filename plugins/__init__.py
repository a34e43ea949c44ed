"""Shipped policy plugins; see gateway/plugins.py for the Protocol."""
