"""Page load of the status page for a synthetic 30-node, 500-container cluster (target: < 200 ms).

    python bench/status_page.py [--nodes 30] [--containers 500] [--runs 30]

Builds a status dict of the shape `/api/status` serves (30 nodes with 2 GPUs each, 500 llama.cpp
containers spread over them with planned and measured VRAM, routing, 30 events), serves it with
`controller.effects.status_http.StatusServer` on loopback, and times whole HTTP requests (connect,
render or serialise, transfer) for `/`, `/api/status` and `/api/status?view=html` (the page's refresh).
The cluster's live probing is not included: it is bounded by the health timeouts, not by the page.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import httpx

from controller.core.status_page import render_page
from controller.effects.status_http import StatusServer

GIB = 2**30


def synthetic(n_nodes: int, n_containers: int) -> dict[str, Any]:
    nodes: dict[str, Any] = {}
    per_node = [n_containers // n_nodes + (1 if i < n_containers % n_nodes else 0) for i in range(n_nodes)]
    k = 0
    for i in range(n_nodes):
        name = f"node-{i:02d}"
        containers, gpus = [], []
        models_on = [[], []]  # type: list[list[dict[str, Any]]]
        for j in range(per_node[i]):
            model = f"model-{k:03d}"
            k += 1
            g = j % 2
            planned = GIB // 2 + (k % 7) * 2**26
            containers.append(
                {"name": f"homelab-{model}", "model": model, "status": "running" if k % 17 else "exited",
                 "gpus": [g], "port": 3000 + j, "gpu_layers": 20 + k % 13,
                 "vram_planned_bytes": planned, "vram_actual_bytes": planned + (k % 5) * 2**24,
                 "vram_over_plan": k % 23 == 0}
            )  # fmt: skip
            models_on[g].append(
                {"model": model, "replica": 0, "container": f"homelab-{model}", "gpu_layers": 20 + k % 13,
                 "layers": 33, "planned_bytes": planned, "actual_bytes": planned + (k % 5) * 2**24,
                 "over_plan": k % 23 == 0}
            )  # fmt: skip
        for g in range(2):
            gpus.append(
                {"index": g, "name": "NVIDIA GeForce RTX 3090", "vram_bytes": 24 * GIB, "reserve_bytes": GIB,
                 "foreign_bytes": GIB // 4, "shortfall_bytes": 0, "capacity_bytes": 22 * GIB,
                 "planned_bytes": sum(m["planned_bytes"] for m in models_on[g]), "used_bytes": 20 * GIB,
                 "models": models_on[g]}
            )  # fmt: skip
        nodes[name] = {
            "reachable": True, "error": None, "containers": containers, "foreign_containers": ["portainer"],
            "ollama": None, "tier": ("local", "remote", "cpu")[i % 3], "ram_bytes": 64 * GIB,
            "state": "DEGRADED" if any(c["status"] != "running" for c in containers) else "HEALTHY",
            "reasons": [f"{c['name']}: exited" for c in containers if c["status"] != "running"],
            "gpus": gpus, "cpu_models": [{"model": f"cpu-{i}", "replica": 0, "runtime": "ollama",
                                          "ram_bytes": 4 * GIB, "status": None}],
        }  # fmt: skip
    endpoints = [
        {"name": f"{n}/llamacpp/{c['model']}", "status": "up" if c["status"] == "running" else "down",
         "error": None if c["status"] == "running" else "connection refused", "latency_ms": 1.2}
        for n, v in nodes.items() for c in v["containers"]
    ]  # fmt: skip
    tiers = {t: {"verdict": "DEGRADED", "endpoints": [e for e in endpoints if e["name"]]} for t in ("local", "remote")}
    routing = [
        {"category": c,
         "chain": [{"category": c,
                    "models": [{"model": f"model-{i:03d}", "state": "up", "why": "answers"} for i in range(4)]}],
         "answer": {"model": "model-000", "node": "node-00", "category": c, "fallback_used": False},
         "reason": "model-000 on node-00: first choice"}
        for c in ("code", "reason", "chat", "vision", "fast", "embed")
    ]  # fmt: skip
    events = [{"time": 1.7e9 + i, "event": "step-done", "node": "node-00", "step": "wait-healthy", "name": "x"}
              for i in range(30)]  # fmt: skip
    watch = {"last_run": {"time": 1.7e9, "trigger": "interval", "ok": True, "duration_s": 2.1,
                          "plan": {"summary": {"add": 0, "change": 0, "destroy": 0}, "steps": 0, "text": ""}},
             "applied": {"spec_hash": "0123456789abcdef", "time": 1.7e9}, "spec_errors": [],
             "next_run": 1.7e9 + 30}  # fmt: skip
    return {
        "cluster": "bench", "generated": time.time(), "spec": {"path": "cluster.yaml", "hash": "0123456789abcdef"},
        "nodes": nodes, "health": {"verdict": "DEGRADED", "reason": "some exited", "tiers": tiers},
        "placement": {"status": "FEASIBLE", "unplaced": [], "notes": []}, "routing": routing,
        "watch": watch, "events": events, "warnings": [],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--containers", type=int, default=500)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    status = synthetic(args.nodes, args.containers)
    t0 = time.perf_counter()
    for _ in range(args.runs):
        render_page(status)
    render_ms = (time.perf_counter() - t0) / args.runs * 1000
    server = StatusServer(lambda: status, max_age=3600)
    port = server.serve(0)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        with httpx.Client(trust_env=False, timeout=30) as client:
            client.get(base + "/")  # the status is built once and cached, as between two refreshes
            for path in ("/", "/api/status", "/api/status?view=html"):
                times, size = [], 0
                for _ in range(args.runs):
                    t = time.perf_counter()
                    r = client.get(base + path)
                    times.append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200
                    size = len(r.content)
                times.sort()
                rows.append((path, statistics.median(times), times[int(0.95 * (len(times) - 1))], max(times), size))
    finally:
        server.close()
    print(f"status page, {args.nodes} nodes, {args.containers} containers, {args.runs} requests each; target < 200 ms")
    print(f"render_page alone: {render_ms:.1f} ms")
    print(f"{'request':<24}{'median ms':>10}{'p95 ms':>10}{'max ms':>10}{'bytes':>10}  target")
    for path, med, p95, worst, size in rows:
        print(f"{path:<24}{med:>10.1f}{p95:>10.1f}{worst:>10.1f}{size:>10}  {'met' if p95 < 200 else 'NOT MET'}")


if __name__ == "__main__":
    main()
