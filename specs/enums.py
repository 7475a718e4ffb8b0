"""Closed sets of values used across the spec language.

They live in `specs` so that `solver` and `controller` can use them without
the import arrow ever pointing back (controller → solver → specs).
"""

from __future__ import annotations

from enum import StrEnum


class Tier(StrEnum):
    """The tiers of the homelab cluster: primary GPU, secondary GPU, NAS/CPU."""

    LOCAL = "local"
    REMOTE = "remote"
    CPU = "cpu"


class Runtime(StrEnum):
    """The inference server a model runs under."""

    OLLAMA = "ollama"
    LLAMACPP = "llamacpp"


class Residency(StrEnum):
    """Whether a model is loaded all the time or only while it is used."""

    PINNED = "pinned"
    """Resident all the time (a container of its own, or an Ollama model kept loaded)."""
    ON_DEMAND = "on-demand"
    """Loaded on request into its GPU's swap pool, unloaded after `ttl` idle."""


class Category(StrEnum):
    """The expert-routing categories a model can serve."""

    CODE = "code"
    REASON = "reason"
    CHAT = "chat"
    VISION = "vision"
    FAST = "fast"
    EMBED = "embed"


class KVCacheType(StrEnum):
    """llama.cpp `--cache-type-k/-v` values homelab plans for."""

    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"


class LayerOrder(StrEnum):
    """How a node's llama.cpp build assigns `-ngl N` layers to the GPU.

    `output-first`: recent builds put the output layer on the GPU first and then the
    last N-1 blocks. `output-last`: older builds put the last N blocks on the GPU and
    the output layer only at N = L+1.
    """

    OUTPUT_FIRST = "output-first"
    OUTPUT_LAST = "output-last"


class GpuAccess(StrEnum):
    """How a node's containers are given its GPUs."""

    NVIDIA = "nvidia"
    DRI = "dri"
    NONE = "none"


class OsFamily(StrEnum):
    """Operating system family of a node, for recovery commands."""

    LINUX = "linux"
    WINDOWS_DOCKER_DESKTOP = "windows-docker-desktop"
