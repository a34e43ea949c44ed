"""The HTTP surface: middlewares, the OpenAI routes, the admin API, SSE."""
