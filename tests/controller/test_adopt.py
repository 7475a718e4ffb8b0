"""Adoption: a spec model that names a container started by hand replaces it with a managed one on its port."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from controller.core.diff import MissingVolume, PortConflict
from controller.core.plan import render_text
from tests.controller.test_importer import MARK_I, MARK_II
from tests.controller.test_reconcile import SPEC, Lab, spec_of, steps

ADOPTING = SPEC.replace(
    "    placement: {node: box, gpus: [0]}\n",
    "    placement: {node: box, gpus: [0]}\n    port: 3009\n    adopt: mark-i\n",
).replace("ports: 3000-3009, volume: models", "ports: 3000-3019, volume: models")

MARK_I_ON_3009 = MARK_I  # llama-server --port 3009 on the host network, its model through a bind mount


def lab_with_mark_i() -> Lab:
    lab = Lab()
    lab.engines["box"].inspected["mark-i"] = dict(MARK_I_ON_3009)
    return lab


def test_adopt_replaces_the_container_on_the_same_port(tmp_path: Path) -> None:
    lab = lab_with_mark_i()
    spec = spec_of(ADOPTING)
    plan = lab.prepare(spec).plan
    text = render_text(plan)
    assert "  ~ adopt container mark-i → homelab-chat (same port 3009); its model is read through a bind mount" in text
    assert "of /srv/models (slow and fragile on Windows Docker hosts): copied into the model volume models" in text
    box = [s for s in steps(plan) if s[0] == "box"]
    # Stopped after the file its replacement reads is copied (it serves until then), before anything starts.
    adopt = box.index(("box", "adopt-container", "mark-i"))
    assert box.index(("box", "copy-file", "models/chat.gguf")) < adopt
    assert adopt < min(i for i, s in enumerate(box) if s[1] == "run-container")
    assert ("box", "run-container", "homelab-chat") in box
    lab.apply(spec, tmp_path)
    engine = lab.engines["box"]
    # Stopped and kept, renamed, its restart policy off: its `docker run` settings are there to go back to.
    assert "mark-i" not in engine.inspected and ("set_aside", "mark-i") in engine.calls
    kept = engine.inspected["mark-i-adopted-by-homelab"]
    assert kept["State"]["Status"] == "exited" and kept["HostConfig"]["RestartPolicy"] == {"Name": "no"}
    assert kept["Args"] == MARK_I_ON_3009["Args"]
    chat = engine.containers["homelab-chat"].config
    assert chat is not None and chat.port == 3009
    again = lab.prepare(spec).plan
    assert again.in_sync and again.steps == ()
    # The kept container holds no port: a managed container that must start again on 3009 is not a conflict.
    engine.containers["homelab-chat"] = replace(engine.containers["homelab-chat"], status="exited", exit_code=1)
    restart = lab.prepare(spec).plan
    assert ("box", "start-container", "homelab-chat") in steps(restart)
    assert all("mark-i" not in s[2] for s in steps(restart))


def test_without_adopt_the_container_stays_and_its_port_is_a_plan_error() -> None:
    lab = lab_with_mark_i()
    spec = spec_of(ADOPTING.replace("    adopt: mark-i\n", ""))
    with pytest.raises(PortConflict, match=r"container homelab-chat would listen on port 3009, which container mark-i"):
        lab.prepare(spec)
    assert "mark-i" in lab.engines["box"].inspected
    # On another port, the hand-started container is left alone.
    plan = lab.prepare(spec_of(ADOPTING.replace("    adopt: mark-i\n", "").replace("port: 3009", "port: 3011"))).plan
    assert all(s[2] != "mark-i" for s in steps(plan)) and "adopt" not in render_text(plan)


# coder's file is already in the user's Docker volume `llm` (mark-ii reads it from there).
CODER_IN_VOLUME = ADOPTING.replace(
    "    source: {gguf: /srv/models/coder.gguf}\n",
    "    source: {gguf: /var/lib/docker/volumes/llm/_data/coder/qwen2.5-coder-7b.gguf, node: box, volume: llm}\n"
    "    port: 3010\n    adopt: mark-ii\n",
)
MARK_II_ON_3010 = {  # llama-server on the host network, its model in the volume `llm`
    **MARK_II,
    "Args": ["--model=/data/coder/qwen2.5-coder-7b.gguf", "-c8192", "-ngl", "0", "--port", "3010"],
    "HostConfig": {"NetworkMode": "host", "PortBindings": {}},
}


def test_a_model_in_a_volume_is_read_there_and_a_bind_mounted_one_copied(tmp_path: Path) -> None:
    lab = lab_with_mark_i()
    box = lab.engines["box"]
    box.inspected["mark-ii"] = dict(MARK_II_ON_3010)
    box.user_volumes.add("llm")
    spec = spec_of(CODER_IN_VOLUME)
    plan = lab.prepare(spec).plan
    text = render_text(plan)
    assert (
        "  ~ adopt container mark-ii → homelab-coder (same port 3010);"
        " its model stays in Docker volume llm (mounted read-only, not copied)"
    ) in text
    assert "  ~ adopt container mark-i → homelab-chat (same port 3009); its model is read through a bind mount" in text
    on_box = [s for s in steps(plan) if s[0] == "box"]
    assert [s for s in on_box if s[1] == "copy-file"] == [("box", "copy-file", "models/chat.gguf")]
    coder = next(c for c in lab.prepare(spec).desired.nodes["box"].containers if c.model == "coder")
    assert coder.config is not None and (coder.config.volume, coder.config.model_file) == (
        "llm",
        "coder/qwen2.5-coder-7b.gguf",
    )
    assert "/models/coder/qwen2.5-coder-7b.gguf" in coder.config.command
    lab.apply(spec, tmp_path)
    assert set(box.volumes) == {"models"} and set(box.volumes["models"]) == {"chat.gguf"}  # llm: untouched
    assert "mark-ii" not in box.inspected and box.containers["homelab-coder"].config == coder.config
    again = lab.prepare(spec).plan
    assert again.in_sync and again.steps == ()


def test_a_volume_that_is_not_on_the_node_is_a_plan_error() -> None:
    lab = lab_with_mark_i()
    lab.engines["box"].inspected["mark-ii"] = dict(MARK_II_ON_3010)
    with pytest.raises(MissingVolume, match=r"node box: model coder reads coder/qwen2.5-coder-7b.gguf from Docker"):
        lab.prepare(spec_of(CODER_IN_VOLUME))
    assert "mark-ii" in lab.engines["box"].inspected


def test_after_a_failed_apply_the_next_plan_redoes_what_failed(tmp_path: Path) -> None:
    """The adopted container is gone and its replacement never answered its health check: the next plan is not
    "No changes" (the replacement was left running with the spec's hash) but starts it again and waits for it."""
    from controller.effects.apply import Executor, StepFailed

    lab = lab_with_mark_i()
    spec = spec_of(ADOPTING)

    def never(url: str, timeout: float, cancelled: object, serves: tuple[str, ...] = ()) -> None:
        raise StepFailed(f"{url} did not answer 200 within {timeout:g}s")

    result = Executor(spec.cluster.name, lab.engines, tmp_path, health_check=never).apply(lab.prepare(spec).plan)
    assert not result.ok
    assert "the container is stopped (the next plan starts it again)" in result.summary()
    again = lab.prepare(spec).plan
    assert not again.in_sync
    box = [s for s in steps(again) if s[0] == "box"]
    assert ("box", "wait-healthy", "homelab-chat") in box
    assert any(s[2] == "homelab-chat" and s[1] in ("start-container", "run-container") for s in box)
    assert "No changes" not in render_text(again)


def test_a_missing_helper_image_is_a_plan_error_where_files_are_copied() -> None:
    """The helper image copies model files: the dry run checks it is on each node with file steps, not the apply."""
    from controller.core.diff import MissingHelperImage

    lab = Lab()
    lab.engines["box"].helper_image = None
    with pytest.raises(MissingHelperImage) as err:
        lab.prepare(spec_of())
    message = str(err.value)
    assert message.startswith("node box: helper image busybox:latest (llamacpp.helper_image)")
    assert "docker pull busybox:latest" in message and "docker load" in message and "\n" not in message
    # A node without file steps does not need it.
    lab = Lab()
    lab.engines["spare"].helper_image = None
    moved = SPEC.replace("placement: {node: spare, cpu_only: true}", "placement: {node: box, cpu_only: true}")
    plan = lab.prepare(spec_of(moved)).plan
    assert not any(s[0] == "spare" for s in steps(plan))


def test_a_container_set_aside_by_adoption_is_not_imported_again() -> None:
    from controller.core.importer import DockerFacts, build_spec

    kept = {**MARK_I_ON_3009, "Name": "/mark-i-adopted-by-homelab", "State": {"Status": "exited"}}
    skipped: list[str] = []
    build_spec("lab", [DockerFacts("box", "127.0.0.1", "unix:///x.sock", [kept])], skipped=skipped)
    assert skipped == [
        "container mark-i-adopted-by-homelab on box: homelab set it aside when a managed container adopted it"
    ]


def _imported(*hosts: str) -> tuple[str, list[str]]:
    from controller.core.importer import DockerFacts, build_spec

    containers = []
    for i, host in enumerate(hosts):
        args = list(MARK_I_ON_3009["Args"])
        args[args.index("--host") + 1] = host
        args[args.index("--port") + 1] = str(3009 + i)
        args[args.index("-m") + 1] = f"/models/model-{i}.gguf"
        containers.append({**MARK_I_ON_3009, "Name": f"/mark-{i}", "Args": args})
    warnings: list[str] = []
    text = build_spec("lab", [DockerFacts("box", "127.0.0.1", "unix:///var/run/docker.sock", containers)], [], None,
                      None, None, None, warnings)  # fmt: skip
    return text, warnings


def test_import_takes_the_node_address_from_the_hosts_its_servers_agree_on() -> None:
    text, warnings = _imported("192.168.1.20", "192.168.1.20")
    assert 'address: "192.168.1.20"' in text and "the --host of every container started by hand here" in text
    assert warnings == []
    # On all addresses, 127.0.0.1 (this machine, a unix:// engine) reaches them: not a guess worth a warning.
    text, warnings = _imported("0.0.0.0")
    assert 'address: "127.0.0.1"' in text and warnings == []
    # They disagree: the endpoint's 127.0.0.1 is kept, said to be a guess in the comment and a warning.
    text, warnings = _imported("192.168.1.20", "10.0.0.5")
    assert 'address: "127.0.0.1"' in text
    assert "guessed: address 127.0.0.1, from the unix:// Docker endpoint; its containers started by hand listen on" in (
        text
    )
    assert warnings == [
        "node box: address 127.0.0.1 is a guess from the unix:// Docker endpoint; its containers started by hand"
        " listen on --host 10.0.0.5, 192.168.1.20; set the address its model servers answer on before"
        " `homelab reconcile`"
    ]
