"""Providers: an authenticated way to reach models. Translation lives with each provider."""
