"""Helpers that drive a real kernelpool server: start it, add users, connect MCP clients.

Shared by tests/, benchmarks/ and scripts/conformance, so that none of them imports another's
code. Not part of the installed package (pyproject ships kernelpool and sandbox only). Modules:
`server` (KernelpoolServer, data folders, the environment of a test server), `client`
(mcp_client and the text/run_code shortcuts).
"""
