"""Small specs for the placement tests, written as YAML."""

from __future__ import annotations

from specs import parse_spec
from specs.model import ClusterSpec

HEAD = """
version: 1
cluster: {name: t}
"""


def spec(nodes: str, models: str) -> ClusterSpec:
    return parse_spec(HEAD + "nodes:\n" + nodes + "models:\n" + models, "x.yaml").spec


def ollama_node(name: str, gpus: list[str], ram: str = "64GiB", tier: str = "local") -> str:
    gpu_text = "".join(f"      - {{index: {i}, name: g, vram: {v}}}\n" for i, v in enumerate(gpus))
    return (
        f"  - name: {name}\n    tier: {tier}\n    address: 10.0.0.1\n    ram: {ram}\n"
        + (f"    gpus:\n{gpu_text}" if gpus else "")
        + '    ollama: {url: "http://10.0.0.1:11434"}\n'
    )


def llama_node(name: str, gpus: list[str], ports: str = "3000-3009", ram: str = "64GiB", tier: str = "remote") -> str:
    gpu_text = "".join(f"      - {{index: {i}, name: g, vram: {v}}}\n" for i, v in enumerate(gpus))
    return f"""  - name: {name}
    tier: {tier}
    address: 10.0.0.2
    ram: {ram}
    docker: {{endpoint: "unix:///var/run/docker.sock"}}
    gpus:
{gpu_text}    llamacpp: {{image: llama, ports: {ports}}}
"""


def model(name: str, vram: str, *, runtime: str = "ollama", layers: int | None = None, extra: str = "") -> str:
    source = f"{{ollama: '{name}'}}" if runtime == "ollama" else f"{{gguf: /m/{name}.gguf}}"
    mem = f"{{vram: {vram}" + (f", layers: {layers}" if layers else "") + "}"
    return f"""  - name: {name}
    runtime: {runtime}
    source: {source}
    memory: {mem}
{extra}"""
