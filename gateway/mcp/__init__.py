"""MCP tool providers: upstream servers, the /mcp endpoint and the tools/call lifecycle."""
