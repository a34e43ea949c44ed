"""Translations between the chat-completions form the pipeline enforces and the other
dialects clients speak (OpenAI Responses, Anthropic Messages). Pure functions, no I/O."""
