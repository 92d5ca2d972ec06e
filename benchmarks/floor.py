"""The MCP SDK's floor: a minimal server on the same SDK with one empty async tool.

Same SDK, same transport settings as kernelpool (streamable HTTP, SSE replies, DNS-rebinding
protection, bearer `TokenVerifier` + `AuthSettings` with a required scope), served by uvicorn
in its own process. `FloorServer` starts it on a free port; run directly with
`python -m benchmarks.floor --port P --token T`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import httpx2
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, TextContent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCOPE = "kernelpool"


def build_app(token: str) -> Any:
    class Verifier:
        async def verify_token(self, given: str) -> AccessToken | None:
            if given != token:
                return None
            return AccessToken(token=given, client_id="bench", subject="bench", scopes=[SCOPE])

    url = "http://127.0.0.1"
    server = MCPServer(
        name="floor", instructions="empty tools", version="0.0.0", token_verifier=Verifier(),
        auth=AuthSettings(issuer_url=url, resource_server_url=f"{url}/mcp", required_scopes=[SCOPE],
                          validate_token_resource=False),
    )

    @server.tool(name="execute_code", description="does nothing")
    async def execute_code(code: str, notebook: str | None = None, timeout: float | None = None) -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text="2")],
                              structured_content={"notebook": notebook, "status": "ok"})

    loopback = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=loopback,
        allowed_origins=[f"http://{h}" for h in loopback],
    )
    return server.streamable_http_app(transport_security=security, session_idle_timeout=1800, host="127.0.0.1")


class FloorServer:
    """The floor server in a child process; `with FloorServer(port, token) as url:`."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.floor", "--port", str(self.port), "--token", self.token],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"floor server exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                httpx2.get(f"http://127.0.0.1:{self.port}/mcp", timeout=1)
                return f"http://127.0.0.1:{self.port}/mcp"
            except httpx2.HTTPError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("floor server did not answer in 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    uvicorn.run(build_app(args.token), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
