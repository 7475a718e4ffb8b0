"""Rendering a replica split over several GPUs: `--tensor-split` from layers, and every GPU requested."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.core.desired import RenderError, llama_server_args, render, tensor_split_args
from controller.drivers.docker import container_create_kwargs
from solver.estimate import layer_devices
from solver.place import SolveParams, place
from solver.problem import Assignment
from solver.profiles import profiles_for
from tests.solver.placecases import llama_node, model, spec

SPLIT = "    placement: {cpu_offload: false, split: true}\n"


def split_assignment() -> Assignment:
    return Assignment(
        model="big",
        replica=0,
        node="n",
        gpus=(0, 2),
        gpu_layers=33,
        layers=33,
        vram_bytes={0: 9 << 30, 2: 5 << 30},
        ram_bytes=1 << 30,
        context=4096,
        layers_per_gpu={0: 20, 2: 13},
    )


def test_tensor_split_is_layers_not_bytes() -> None:
    a = split_assignment()
    # Bytes would say 0.643,0.357 (9 and 5 GiB, each with its own compute buffer and overhead);
    # llama.cpp divides layers, so the split says how many layers each GPU holds.
    assert tensor_split_args(a) == ["--split-mode", "layer", "--tensor-split", "20,13"]
    devices = layer_devices(32, 33, (20, 13))
    assert devices.count(0) == 20 and devices.count(1) == 13 and devices[32] == 1


def test_one_gpu_has_no_split() -> None:
    a = replace(split_assignment(), gpus=(1,), vram_bytes={1: 5 << 30}, layers_per_gpu={})
    assert tensor_split_args(a) == []


def test_split_without_layers_is_refused() -> None:
    with pytest.raises(RenderError, match="without its layers per GPU"):
        tensor_split_args(replace(split_assignment(), layers_per_gpu={}))
    with pytest.raises(RenderError, match="without its layers per GPU"):
        tensor_split_args(replace(split_assignment(), layers_per_gpu={0: 20, 2: 12}))


def test_placed_split_renders_tensor_split_and_all_gpus() -> None:
    s = spec(
        llama_node("n", ["8GiB", "8GiB", "8GiB"]), model("big", "20GiB", runtime="llamacpp", layers=40, extra=SPLIT)
    )
    r = place(s, profiles_for(s), params=SolveParams(time_limit=5.0, workers=1))
    [a] = r.assignments
    assert len(a.gpus) == 3
    [c] = render(s, r).nodes["n"].containers
    assert c.config is not None
    cmd = list(c.config.command)
    counts = [a.layers_per_gpu[i] for i in a.gpus]
    assert cmd[cmd.index("--tensor-split") + 1] == ",".join(map(str, counts))
    assert cmd[cmd.index("--split-mode") + 1] == "layer"
    assert cmd[cmd.index("-ngl") + 1] == "41"
    # llama.cpp, given that split, puts exactly the placed blocks on each GPU and the output on the last.
    devices = layer_devices(40, 41, counts)
    assert [devices.count(j) for j in range(3)] == counts and devices[40] == 2
    assert c.config.gpus == a.gpus == (0, 1, 2)
    kwargs = container_create_kwargs(c)
    assert kwargs["device_requests"][0]["DeviceIDs"] == ["0", "1", "2"]
    assert tuple(llama_server_args(s.model("big"), s.node("n"), a, c.config.port)) == c.config.command
