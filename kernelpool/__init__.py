"""kernelpool: a sandboxed multi-user Jupyter kernel server for AI agents, over MCP."""

__version__ = "0.1.0"
