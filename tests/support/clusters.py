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


TRIPLET_CAPACITY = 1000
"""Falkenauer's triplet instances use bins of 1000; one unit is 1 MiB of VRAM here (a multiple of the
solver's 64 KiB unit, so that rounding cannot spoil the perfect packing)."""


def triplet_sizes(k: int, seed: int, capacity: int = TRIPLET_CAPACITY) -> list[int]:
    """3k sizes strictly between capacity/4 and capacity/2 that fill k bins exactly, three to a bin (shuffled).

    Falkenauer's construction: per bin a first item in [0.38, 0.49]·C, a second between C/4 and
    what leaves the third above C/4, the third the rest; so the optimum is exactly k bins.
    """
    rng = random.Random(seed)
    quarter = capacity // 4
    sizes: list[int] = []
    for _ in range(k):
        while True:
            a = rng.randint(int(0.38 * capacity), int(0.49 * capacity))
            b = rng.randint(quarter + 1, capacity - a - quarter - 1)
            c = capacity - a - b
            if all(quarter < x < capacity // 2 for x in (a, b, c)):
                break
        sizes += [a, b, c]
    rng.shuffle(sizes)
    return sizes


def triplet_spec(k: int, seed: int, n_nodes: int = 4) -> ClusterSpec:
    """k identical GPUs of TRIPLET_CAPACITY MiB over `n_nodes` nodes, and 3k full-offload models whose
    declared VRAM are `triplet_sizes`: every model fits only in the perfect packing of k full GPUs."""
    unit = 1 << 20
    per_node = [k // n_nodes + (1 if i < k % n_nodes else 0) for i in range(n_nodes)]
    nodes = [
        {
            "name": f"n{i}",
            "tier": "local",
            "address": f"10.0.0.{i + 1}",
            "ram": 1024 * GIB,
            "gpus": [{"index": j, "name": "gpu", "vram": TRIPLET_CAPACITY * unit} for j in range(g)],
            "ollama": {"url": f"http://10.0.0.{i + 1}:11434"},
        }
        for i, g in enumerate(per_node)
        if g
    ]
    models = [
        {
            "name": f"t{i}",
            "runtime": "ollama",
            "source": {"ollama": f"t{i}"},
            "memory": {"vram": size * unit},
            "placement": {"cpu_offload": False},
        }
        for i, size in enumerate(triplet_sizes(k, seed))
    ]
    return ClusterSpec.model_validate({"cluster": {"name": "triplets"}, "nodes": nodes, "models": models})


def pool_spec(n_models: int, n_gpus: int, n_nodes: int, seed: int, demand: float = 2.5) -> ClusterSpec:
    """A cluster with more models than VRAM (issue 17): a quarter of the models pinned, filling about 40 % of
    the VRAM; the rest `residency: on-demand`, together `demand` × the VRAM (each 0.5–1.5 × their mean, at most
    28 % of the smallest card, so that two fit beside its share of pinned models). Nodes run llama.cpp or
    Ollama (max_loaded 1 or 2) and have RAM enough for a CPU pool. Half the models may run partly on the CPU."""
    rng = random.Random(seed)
    per_node = [n_gpus // n_nodes + (1 if i < n_gpus % n_nodes else 0) for i in range(n_nodes)]
    nodes: list[dict[str, Any]] = []
    for i, k in enumerate(per_node):
        node: dict[str, Any] = {
            "name": f"n{i}",
            "tier": "local",
            "address": f"10.0.0.{i + 1}",
            "ram": rng.choice((64, 128)) * GIB,
            "ram_reserve": 4 * GIB,
            "gpus": [{"index": j, "name": "gpu", "vram": rng.choice((12, 16, 24)) * GIB} for j in range(k)],
        }
        if rng.random() < 0.5:
            node["docker"] = {"endpoint": "unix:///var/run/docker.sock"}
            node["llamacpp"] = {"image": "llama", "ports": "3000-3031", "max_loaded": rng.choice((1, 2))}
        else:
            node["ollama"] = {"url": f"http://10.0.0.{i + 1}:11434", "max_loaded": rng.choice((1, 2))}
        nodes.append(node)
    runtimes = {n["name"]: "llamacpp" if "llamacpp" in n else "ollama" for n in nodes}
    vram = sum(g["vram"] for n in nodes for g in n["gpus"]) / 1e9
    n_pinned = max(1, n_models // 4)
    pinned = [rng.uniform(1.0, 8.0) for _ in range(n_pinned)]
    pinned = [s * 0.4 * vram / sum(pinned) for s in pinned]
    mean = demand * vram / (n_models - n_pinned)
    cap = 0.28 * min((g["vram"] for n in nodes for g in n["gpus"]), default=12 * GIB) / 1e9
    od = [min(cap, mean * rng.uniform(0.5, 1.5)) for _ in range(n_models - n_pinned)]
    models: list[dict[str, Any]] = []
    for i, size in enumerate(pinned + od):
        runtime = runtimes[f"n{rng.randrange(n_nodes)}"]  # as many of each runtime as nodes offer it
        models.append(
            {
                "name": f"m{i}",
                "runtime": runtime,
                "source": {"gguf": f"/m/{i}.gguf"} if runtime == "llamacpp" else {"ollama": f"m{i}"},
                "priority": rng.randint(0, 100),
                "memory": {"vram": int(size * 1e9), "ram": int(0.3e9), "layers": rng.randint(20, 80)},
                "placement": {"cpu_offload": rng.random() < 0.5},
                **({"residency": "on-demand", "ttl": "10m"} if i >= n_pinned else {}),
            }
        )
    return ClusterSpec.model_validate({"cluster": {"name": "pools"}, "nodes": nodes, "models": models})
