"""The lab's Gemma has no chat template in its file: every llama-server the lab runs Gemma with names one."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from controller.core.desired import llama_server_args
from solver.problem import Assignment
from specs import load_spec
from specs.enums import Runtime

REPO = Path(__file__).resolve().parents[2]
# llama-server's built-in template; `--no-jinja` before it, or Jinja (on by default) takes "gemma" as the
# template's whole text (checked by hand against the project's llama.cpp build: /apply-template gave "gemma").
GEMMA_CHAT = ("--no-jinja", "--chat-template", "gemma")


def lab_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lab_under_test", REPO / "examples" / "lab" / "lab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lab_spec_gives_every_gemma_container_the_gemma_template() -> None:
    spec = load_spec(REPO / "examples" / "lab" / "cluster.yaml").spec
    gemma = [m for m in spec.models if m.runtime is Runtime.LLAMACPP and "gemma" in str(m.source.gguf)]
    assert [m.name for m in gemma] == ["coder", "reasoner", "chatter"]
    remote = next(n for n in spec.nodes if n.name == "remote")
    for model in gemma:
        assignment = Assignment(model.name, 0, "remote", (0,), 0, 19, {0: 0}, 0, model.context)
        args = llama_server_args(model, remote, assignment, 3000)
        i = args.index("--no-jinja")
        assert args[i : i + 3] == GEMMA_CHAT, model.name


def test_the_standins_llama_server_uses_the_same_template() -> None:
    assert lab_module().GEMMA_CHAT == GEMMA_CHAT
