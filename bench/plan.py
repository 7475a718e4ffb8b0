"""Diff and plan at scale: 30 nodes and 500 containers.

    python bench/plan.py [--nodes 30] [--containers 500] [--repeat 5]

Builds a desired state and an observed one that differs from it the way a busy
cluster does (a tenth of the containers have a changed context, a tenth are
missing, a twentieth have exited, a few are no longer in the spec, some files
are missing) and times `diff` + `make_plan` together. Target: ≤ 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.core.diff import diff
from controller.core.plan import make_plan
from controller.core.state import (
    LABEL_CONFIG,
    ClusterState,
    ContainerConfig,
    ContainerState,
    FileState,
    NodeState,
    VolumeState,
    health_url,
)


def container(node: str, i: int, context: int) -> ContainerState:
    config = ContainerConfig(
        image="ghcr.io/ggml-org/llama.cpp:server-cuda",
        command=("-m", f"/models/m{i}.gguf", "--port", str(3000 + i % 100), "-c", str(context), "-ngl", "99"),
        model_file=f"m{i}.gguf",
        context=context,
        gpu_layers=99,
        port=3000 + i % 100,
        alias=f"m{i}",
        cache_type="f16",
        gpus=(i % 4,),
        gpu_access="nvidia",
        volume="models",
    )
    return ContainerState(
        name=f"homelab-m{i}",
        node=node,
        model=f"m{i}",
        replica=0,
        config=config,
        config_hash=config.digest(),
        health_url=health_url("10.0.0.1", config.port),
        labels={LABEL_CONFIG: json.dumps(config.to_json())},
    )


def states(n_nodes: int, n_containers: int, seed: int) -> tuple[ClusterState, ClusterState]:
    rng = random.Random(seed)
    want: dict[str, NodeState] = {}
    have: dict[str, NodeState] = {}
    for n in range(n_nodes):
        node = f"node{n}"
        ids = range(n, n_containers, n_nodes)
        desired = [container(node, i, 8192) for i in ids]
        files = [FileState(node, "models", f"m{i}.gguf", source=f"/srv/m{i}.gguf") for i in ids]
        observed: list[ContainerState] = []
        for c in desired:
            r = rng.random()
            if r < 0.1:
                continue  # missing
            if r < 0.2:
                assert c.config is not None
                old = replace(c.config, context=4096)
                observed.append(replace(c, config=old, config_hash=old.digest()))
            elif r < 0.25:
                observed.append(replace(c, status="exited", exit_code=137))
            else:
                observed.append(c)
        observed += [container(node, 10_000 + n * 10 + k, 8192) for k in range(rng.randint(0, 2))]
        have_files = [replace(f, source=None, size=1 << 30) for f in files if rng.random() > 0.05]
        want[node] = NodeState(
            node, volumes=(VolumeState(node, "models"),), files=tuple(files), containers=tuple(desired)
        )
        have[node] = NodeState(
            node, volumes=(VolumeState(node, "models"),), files=tuple(have_files), containers=tuple(observed)
        )
    return ClusterState("bench", want), ClusterState("bench", have)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--containers", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    desired, observed = states(args.nodes, args.containers, 0)
    times = []
    plan = None
    for _ in range(args.repeat):
        t = time.perf_counter()
        result = diff(desired, observed)
        plan = make_plan("bench", result, observed.fingerprint())
        times.append(time.perf_counter() - t)
    assert plan is not None
    add, change, destroy = plan.counts()
    print(f"{'nodes':>6} {'containers':>10} {'changes':>8} {'steps':>6} {'median s':>9} {'max s':>7}  target")
    print(
        f"{args.nodes:>6} {args.containers:>10} {len(plan.changes):>8} {len(plan.steps):>6}"
        f" {statistics.median(times):>9.3f} {max(times):>7.3f}  ≤ 0.5 s"
    )
    print(f"plan: {add} to add, {change} to change, {destroy} to destroy")


if __name__ == "__main__":
    main()
