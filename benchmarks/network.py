"""`python -m benchmarks.network`: what a user's network namespace costs at kernel start.

The first kernel of a user makes the user's namespace (and, in "egress", its veth pair, routes,
nftables element and, where Docker runs, DOCKER-USER rules); later kernels of that user only
join it with setns(). Measured two ways, as root:

  mechanism   `sandbox.network.UserNetworks.ensure` + `remove` alone, per mode
  first       through a real server with pool_size=0, one MCP client: `use_notebook(create)` +
              `insert_execute_code_cell("1+1")` on a new notebook when the user has no kernel
              (the namespace is made) against the same with another kernel of the user running
              (it is joined), for kernel_network egress, none and host (host: no namespace)

Prints a table and writes JSON (default benchmarks/results/network-<timestamp>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import os
import sys
import time
from typing import Any

from benchmarks.harness import Bench
from benchmarks.scenarios import WrongResult, call, texts
from benchmarks.stats import summary
from testkit.client import mcp_client

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def mechanism(samples: int) -> dict[str, Any]:
    from sandbox.network import NetworkPlan, UserNetworks, resolvers_from

    out: dict[str, Any] = {}
    resolvers, _ = resolvers_from()
    for mode in ("egress", "none"):
        plan = NetworkPlan(mode=mode, prefix=f"b{os.getpid() % 1000}x",
                           addresses=ipaddress.IPv4Network("10.238.0.0/24"), resolvers=tuple(resolvers))
        nets = UserNetworks(plan)
        made: list[float] = []
        removed: list[float] = []
        try:
            nets.start()
            for i in range(samples):
                t0 = time.perf_counter()
                nets.ensure(63900 + i % 50)
                t1 = time.perf_counter()
                nets.remove(63900 + i % 50)
                t2 = time.perf_counter()
                made.append(t1 - t0)
                removed.append(t2 - t1)
        finally:
            nets.close()
        out[mode] = {"ensure_ms": summary(made), "remove_ms": summary(removed)}
    return out


async def first_kernels(bench: Bench, samples: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("egress", "none", "host"):
        d = await bench.data_dir([f"nw-{mode}"])
        token = d.tokens[f"nw-{mode}"]
        making: list[float] = []
        joining: list[float] = []

        async def first(client: Any, path: str) -> float:
            t0 = time.perf_counter()
            await call(client, "use_notebook", {"notebook": path, "mode": "create"})
            r = await call(client, "insert_execute_code_cell", {"notebook": path, "cell_index": -1, "cell_source": "1+1"})
            took = time.perf_counter() - t0
            if texts(r) != "2":
                raise WrongResult(f"1+1 in {path} answered {texts(r)!r}")
            return took

        async with bench.server(d, pool_size="0", kernel_network=mode) as srv, mcp_client(srv.url, token) as c:
            await first(c, "nw/prime.ipynb")  # the server's own first kernel: not measured
            await call(c, "unuse_notebook", {"notebook": "nw/prime.ipynb"})
            for i in range(samples):
                # the user has no kernel: this one makes the namespace, and then holds it
                making.append(await first(c, f"nw/make-{i}.ipynb"))
                joining.append(await first(c, f"nw/join-{i}.ipynb"))
                await call(c, "unuse_notebook", {"notebook": f"nw/join-{i}.ipynb"})
                await call(c, "unuse_notebook", {"notebook": f"nw/make-{i}.ipynb"})  # the namespace goes
        out[mode] = {"first_kernel_of_user_ms": summary(making), "later_kernel_ms": summary(joining),
                     "server_exit": srv.exit_code, "leftovers": srv.leftovers}
    return out


def render(result: dict[str, Any]) -> str:
    def cell(s: dict[str, Any]) -> str:
        return f"{s['p50']:.1f} / {s['p90']:.1f} / {s['p99']:.1f}"

    lines = ["| mode | namespace made: ensure | namespace removed | first kernel of a user (makes it) | "
             "later kernel (joins it) | difference p50 |", "| --- | --- | --- | --- | --- | --- |"]
    for mode in ("egress", "none", "host"):
        mech = result["mechanism"].get(mode)
        fk = result["first"][mode]
        diff = fk["first_kernel_of_user_ms"]["p50"] - fk["later_kernel_ms"]["p50"]
        lines.append(f"| {mode} | {cell(mech['ensure_ms']) if mech else '–'} | {cell(mech['remove_ms']) if mech else '–'} | "
                     f"{cell(fk['first_kernel_of_user_ms'])} | {cell(fk['later_kernel_ms'])} | {diff:+.1f} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("benchmarks.network needs root", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "samples": args.samples}
    result["mechanism"] = await asyncio.to_thread(mechanism, args.mechanism_samples)
    async with Bench() as bench:
        result["first"] = await first_kernels(bench, args.samples)
    result["cleanup_problems"] = bench.cleanup_problems
    print(render(result))
    path = args.json_path or os.path.join(RESULTS, f"network-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    bad = bench.cleanup_problems or any(v["leftovers"] or v["server_exit"] not in (0, None)
                                        for v in result["first"].values())
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.network", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=15, help="first: samples of each kind per mode (15)")
    p.add_argument("--mechanism-samples", type=int, default=50, help="mechanism: ensure/remove pairs per mode (50)")
    p.add_argument("--json", dest="json_path")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
