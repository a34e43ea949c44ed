"""ABC Gateway: an OpenAI-compatible gateway that enforces frozen, compiled plans inline."""

__version__ = "0.1.0"
