"""kernelpool: a sandboxed multi-user Jupyter kernel server for AI agents, over MCP."""

# the one place the version is written: pyproject.toml reads it (dynamic version), the server
# reports it (MCP's serverInfo, /healthz), and tests/test_docs.py checks the image tags in the docs
__version__ = "0.1.0"
