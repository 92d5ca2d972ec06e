"""The results as Markdown tables (what `python -m benchmarks.sessions` prints)."""

from __future__ import annotations

from typing import Any


def _v(x: Any, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(s: dict[str, Any] | None) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{_v(s['p50'])} / {_v(s['p90'])} / {_v(s['p99'])}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = [
        f"## kernelpool benchmark ({r['started_at']}{', quick' if r.get('quick') else ''})",
        "",
        f"Machine: {m['cpus']} CPUs ({m.get('cpu_model')}), {m['memory_gb']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; mcp {m['mcp']}, jupyter_client {m['jupyter_client']}, ipykernel {m['ipykernel']}, "
        f"pyzmq {m['pyzmq']}. Load average at start {m['load_avg_at_start']}. Isolation: {r.get('isolation')}.",
        "Times in ms as p50 / p90 / p99 unless marked.",
    ]
    if "first" in r:
        f = r["first"]
        out += ["", "### 1. Time to first result of `1+1` on a notebook without a kernel", ""]
        if "failed" in f:
            out.append(f"FAILED: {f['failed']}")
        else:
            stock = f["stock_ms"]["p50"]
            rows = [
                ["pool hit (warm kernel of the user)", str(f["pool_hit_ms"]["n"]), _pct(f["pool_hit_ms"]),
                 _pct(f["pool_hit_use_notebook_ms"]), _v(f["ratio_hit_over_stock_p50"], ".2f")],
                ["pool miss (pool_size=0)", str(f["pool_miss_ms"]["n"]), _pct(f["pool_miss_ms"]),
                 _pct(f["pool_miss_use_notebook_ms"]), _v(f["ratio_miss_over_stock_p50"], ".2f")],
                ["stock jupyter_client start + execute", str(f["stock_ms"]["n"]), _pct(f["stock_ms"]), "-",
                 "1.00" if stock else "-"],
            ]
            out += _table(["", "n", "total", "of which use_notebook", "p50 / stock p50"], rows)
    if "execute" in r:
        e = r["execute"]
        out += ["", "### 2. Trivial `execute_code` (`1+1`) against its two parts", ""]
        rows = []
        for mode in ("legacy", "auto"):
            x = e.get(mode)
            if not x:
                continue
            rows.append([mode, _pct(x["kernelpool_ms"]), _pct(x["kernelpool_execution_inside_ms"]),
                         _pct(x["jupyter_client_ms"]), _pct(x["mcp_floor_ms"]), _v(x["overhead_p50_ms"], "+.2f")])
        if "failed" in e:
            out.append(f"FAILED: {e['failed']}")
        out += _table(["client mode", "kernelpool execute_code", "(execution inside the server)",
                       "(a) bare jupyter_client", "(b) empty tool, same SDK", "overhead p50 = kp − (a + b)"], rows)
    if "concurrency" in r:
        c = r["concurrency"]
        out += ["", "### 3. Concurrent sessions (open loop: 1 cell / 2 s each, 4 s above 100 sessions; closed loop: back to back)", ""]
        if "failed" in c:
            out.append(f"FAILED: {c['failed']}")
        rows = []
        for n, lv in c.get("levels", {}).items():
            for who in ("stock", "kernelpool"):
                x = lv.get(who)
                if x is None or "failed" in x:
                    rows.append([n, who, "FAILED: " + (x or {}).get("failed", "not run")[:200]] + [""] * 7)
                    continue
                o, cl = x["open"], x["closed"]
                tput = cl["throughput_per_s"]
                rel = "-"
                if who == "kernelpool" and lv["stock"]["closed"]["throughput_per_s"]:
                    rel = f"{100 * tput / lv['stock']['closed']['throughput_per_s']:.0f}%"
                disk = x.get("notebooks_on_disk", {})
                wrong = (o["errors"] + cl["errors"], o["crosstalk_replies"] + cl["crosstalk_replies"]
                         + disk.get("misplaced", 0) + disk.get("wrong_output", 0))
                mem = x["kernels_idle"]
                rows.append([
                    n, "kernelpool" if who == "kernelpool" else "jupyter_client",
                    _v(x["all_ready_s"], ".1f"),
                    f"{_pct(o['latency_ms'])} ({o['cells']})",
                    f"{_pct(cl['latency_ms'])} ({cl['cells']})",
                    _v(tput, ".0f") + (f" ({rel})" if rel != "-" else ""),
                    _v(cl["fairness_p99_over_p50"], ".1f"),
                    f"{wrong[0]} / {wrong[1]}",
                    _v(x.get("server_rss", {}).get("max_mb"), ".0f") if who == "kernelpool" else "-",
                    f"{_v(mem['pss_total_mb'], '.0f')} ({mem['processes']})",
                ])
        out += _table(["N", "driver", "all ready (s)", "open loop (cells)", "closed loop (cells)",
                       "closed cells/s (vs stock)", "closed p99/p50", "errors / cross-talk",
                       "server RSS max (MB)", "kernel PSS MB (kernels)"], rows)
    if "memory" in r:
        mm = r["memory"]
        out += ["", f"### 4. Idle kernel memory ({mm.get('kernels')} kernels each, after one `1+1`)", ""]
        if "failed" in mm:
            out.append(f"FAILED: {mm['failed']}")
        else:
            rows = [[who, str(mm[who]["processes"]), _v(mm[who]["pss_per_kernel_mb"]), _v(mm[who]["uss_per_kernel_mb"]),
                     _v(mm[who]["rss_per_kernel_mb"])] for who in ("kernelpool", "stock")]
            out += _table(["", "kernels", "PSS MB / kernel", "USS MB / kernel", "RSS MB / kernel"], rows)
    if "growth" in r:
        g = r["growth"]
        out += ["", f"### 5. Growth: one more cell as the notebook grows ({g.get('payload_kb')} KB printed per cell)", ""]
        if "failed" in g:
            out.append(f"FAILED: {g['failed']}")
        rows = [[_v(c["size_mb"]), str(c["cells"]), _pct(c["per_cell_ms"]), _pct(c["nbformat_write_ms"]),
                 _v(c["ratio_p50_over_nbformat_write"], ".2f")] for c in g.get("checkpoints", [])]
        out += _table(["notebook MB", "cells", "per cell (last 20)", "nbformat.write of that file", "p50 / write p50"], rows)
    out += ["", f"Seconds per scenario: {r.get('seconds')}"]
    return "\n".join(out)
