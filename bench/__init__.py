"""ABC Gateway's benchmark: the gateway vs a direct call vs LiteLLM's proxy, side by side."""
