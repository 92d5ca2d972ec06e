"""Benchmarks for kernelpool: real servers, real MCP clients over HTTP, baselines in the same run.

Run `python -m benchmarks.sessions --help`. Timings live here, not in the tests; a benchmark
exits non-zero only when a result is wrong (an error, a reply or a cell in the wrong place).
"""
