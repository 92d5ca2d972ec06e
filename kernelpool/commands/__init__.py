"""The `kernelpool` commands, one module per command (`kernelpool.cli` parses and dispatches)."""
