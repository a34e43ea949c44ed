"""The request spine: authenticate, authorize (PEP), budget, usage."""
