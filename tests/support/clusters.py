"""Random clusters for the placement benchmark and tests (bench/solver.py, tests/solver)."""

from __future__ import annotations

import random
from typing import Any

from specs.model import ClusterSpec

GIB = 1 << 30
CARDS = (8, 12, 16, 24, 48, 80)


def random_spec(n_models: int, n_gpus: int, n_nodes: int, seed: int, tight: bool = False) -> ClusterSpec:
    """A random cluster; `tight`: demand 90–110 % of the VRAM, half the models full offload only, 16–32 GiB RAM."""
    rng = random.Random(seed)
    per_node = [0] * n_nodes
    for i in range(n_gpus):
        per_node[i % n_nodes] += 1
    nodes: list[dict[str, Any]] = []
    for i, k in enumerate(per_node):
        llama = rng.random() < 0.5
        node: dict[str, Any] = {
            "name": f"n{i}",
            "tier": "local" if k else "cpu",
            "address": f"10.0.0.{i + 1}",
            "ram": rng.choice((16, 32) if tight else (32, 64, 128, 256)) * GIB,
            "ram_reserve": 4 * GIB,
            "gpus": [{"index": j, "name": "gpu", "vram": rng.choice(CARDS) * GIB} for j in range(k)],
            "ollama": {"url": f"http://10.0.0.{i + 1}:11434"},
        }
        if llama:
            node["docker"] = {"endpoint": "unix:///var/run/docker.sock"}
            node["llamacpp"] = {"image": "llama", "ports": "3000-3031"}
        nodes.append(node)
    sizes = [rng.uniform(0.5, 70.0) if rng.random() < 0.3 else rng.uniform(0.5, 12.0) for _ in range(n_models)]
    if tight:
        vram = sum(g["vram"] for n in nodes for g in n["gpus"]) / 1e9
        scale = rng.uniform(0.9, 1.1) * vram / sum(sizes)
        sizes = [s * scale for s in sizes]
    models: list[dict[str, Any]] = []
    for i, size in enumerate(sizes):
        runtime = "llamacpp" if rng.random() < 0.4 else "ollama"
        source = {"gguf": f"/m/{i}.gguf"} if runtime == "llamacpp" else {"ollama": f"m{i}"}
        models.append(
            {
                "name": f"m{i}",
                "runtime": runtime,
                "source": source,
                "priority": rng.randint(0, 100),
                "memory": {"vram": int(size * 1e9), "ram": int(0.3e9), "layers": rng.randint(20, 80)},
                "placement": {"cpu_offload": not tight or rng.random() < 0.5},
            }
        )
    return ClusterSpec.model_validate({"cluster": {"name": "bench"}, "nodes": nodes, "models": models})
