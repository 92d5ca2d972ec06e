"""The MCP tool layer: the only part of kernelpool (with the app that mounts it) that imports the MCP SDK."""
