"""The demo's MCP server: one tool, over stdio, started by the gateway (`abc-gateway demo`).

Offline and deterministic: `lookup_order` answers from a fixed table.
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel

server = MCPServer("shop", log_level="WARNING")
ORDERS = {"A-1234": ("shipped", "tomorrow")}


class Order(BaseModel):
    order_id: str
    status: str
    eta: str | None


@server.tool(description="Find an order by its id, e.g. A-1234.")
def lookup_order(order_id: str) -> Order:
    status, eta = ORDERS.get(order_id, ("unknown", None))
    return Order(order_id=order_id, status=status, eta=eta)


if __name__ == "__main__":
    server.run("stdio")
