"""Adoption: a spec model that names a container started by hand replaces it with a managed one on its port."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.core.diff import PortConflict
from controller.core.plan import render_text
from tests.controller.test_importer import MARK_I
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
    assert "of /srv/models (slow and fragile on Windows Docker hosts): copied into the model volume" in text
    box = [s for s in steps(plan) if s[0] == "box"]
    assert box[0] == ("box", "adopt-container", "mark-i")  # removed before anything starts
    assert ("box", "run-container", "homelab-chat") in box
    lab.apply(spec, tmp_path)
    engine = lab.engines["box"]
    assert "mark-i" not in engine.inspected and ("remove_container", "mark-i") in engine.calls
    chat = engine.containers["homelab-chat"].config
    assert chat is not None and chat.port == 3009
    again = lab.prepare(spec).plan
    assert again.in_sync and again.steps == ()


def test_without_adopt_the_container_stays_and_its_port_is_a_plan_error() -> None:
    lab = lab_with_mark_i()
    spec = spec_of(ADOPTING.replace("    adopt: mark-i\n", ""))
    with pytest.raises(PortConflict, match=r"container homelab-chat would listen on port 3009, which container mark-i"):
        lab.prepare(spec)
    assert "mark-i" in lab.engines["box"].inspected
    # On another port, the hand-started container is left alone.
    plan = lab.prepare(spec_of(ADOPTING.replace("    adopt: mark-i\n", "").replace("port: 3009", "port: 3011"))).plan
    assert all(s[2] != "mark-i" for s in steps(plan)) and "adopt" not in render_text(plan)
