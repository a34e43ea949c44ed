"""The MCP server the tools/call benchmark calls: the SDK's MCPServer, streamable HTTP, one tool.

Run: python -m bench.mcp_upstream --port N
"""

from __future__ import annotations

import argparse

from mcp.server.mcpserver import MCPServer

server = MCPServer("bench", log_level="WARNING")


@server.tool(description="Echo the text back.")
def echo(text: str) -> str:
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json", action="store_true", help="answer with JSON bodies instead of SSE")
    args = parser.parse_args()
    server.run("streamable-http", host="127.0.0.1", port=args.port, json_response=args.json)
