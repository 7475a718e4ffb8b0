"""The multi-GPU layer split (llama.cpp `--split-mode layer`) on hand-computed cases."""

from __future__ import annotations

import pytest

from solver.errors import EstimateError
from solver.estimate import (
    SPLIT_PIPELINE_COPIES,
    EstimateParams,
    estimate,
    estimate_split,
    kv_layer_bytes,
    layer_devices,
    split_curve,
    split_layers,
    tensor_split_for,
)
from solver.profiles import declared_curve, declared_split_curve
from specs.model import DeclaredMemory
from tests.solver.test_estimate import toy  # four blocks of 100/200/300/400 bytes, 1000 B in, 50 B out

MIB = 1 << 20


@pytest.mark.parametrize(
    ("n_layer", "ngl", "split", "devices"),
    [
        # L = 4, full offload: act = 5, layer il goes to the first j with splits[j] > il/5.
        (4, 5, (1, 1), (0, 0, 0, 1, 1)),  # splits 0.5, 1: il/5 = 0, .2, .4 | .6, .8 (output)
        (4, 5, (3, 2), (0, 0, 0, 1, 1)),  # 0.6: 0.6 is not > 0.6, so layer 3 goes to device 1
        (4, 5, (1, 4), (0, 1, 1, 1, 1)),  # 0.2
        (4, 5, (1, 0, 1), (0, 0, 0, 2, 2)),  # a 0 share gets nothing
        (4, 5, (1, 1, 0), (0, 0, 0, 1, 1)),  # the output goes to the last device with a share
        (4, 5, (1,), (0, 0, 0, 0, 0)),
        # partial offload (the older rule): the last ngl blocks, act = ngl
        (4, 2, (1, 1), (-1, -1, 0, 1, -1)),  # start 2, act 2: 0/2 → 0, 1/2 → 1; output not offloaded
        (4, 0, (1, 1), (-1, -1, -1, -1, -1)),
    ],
)
def test_layer_devices_follow_llama_cpp(
    n_layer: int, ngl: int, split: tuple[int, ...], devices: tuple[int, ...]
) -> None:
    assert layer_devices(n_layer, ngl, split) == devices


def test_fractional_proportions() -> None:
    # 32 blocks + output = 33 layers at 0.6/0.4: layers il/33 < 0.6 (il ≤ 19) on device 0.
    assert split_layers(32, (0.6, 0.4)) == (20, 13)
    assert split_layers(32, (3, 1)) == (25, 8)  # 0.75·33 = 24.75: il ≤ 24


@pytest.mark.parametrize("blocks", [(16, 16), (20, 12), (0, 32), (32, 0), (10, 11, 11), (1, 0, 31), (5, 0, 0, 27)])
def test_tensor_split_for_reproduces_the_counts(blocks: tuple[int, ...]) -> None:
    split = tensor_split_for(blocks)
    assert split_layers(32, split) == (*blocks[:-1], blocks[-1] + 1)
    devs = layer_devices(32, 33, split)
    # Contiguous blocks in device order, the output layer on the last device.
    assert list(devs[:32]) == sorted(devs[:32])
    assert devs[32] == len(blocks) - 1


def test_bad_split() -> None:
    with pytest.raises(EstimateError):
        layer_devices(4, 5, ())
    with pytest.raises(EstimateError):
        layer_devices(4, 5, (0, 0))
    with pytest.raises(EstimateError):
        layer_devices(4, 5, (1, -1))


def test_estimate_split_hand_computed() -> None:
    params = EstimateParams(ctx=512, gpu_overhead=300 * MIB)
    shape = toy()
    kv = kv_layer_bytes(shape, params)
    # 512 cells · 2 kv heads · 16 · 2 bytes, K and V: 64 KiB a layer.
    assert kv == (65536,) * 4
    single = estimate(shape, 5, params)
    embd = 4 * 512 * 64  # one T x E f32 tensor
    compute = single.compute_gpu + 2 * embd  # each device is charged the whole graph (an upper bound)
    inputs = single.compute_cpu - embd  # the graph inputs (the host also keeps the embeddings)
    per_device = compute + (SPLIT_PIPELINE_COPIES - 1) * inputs
    e = estimate_split(shape, params, (1, 1))  # blocks 0-2 on device 0; block 3 and the output on device 1
    assert e.layers == (3, 2)
    d0, d1 = e.devices
    assert (d0.weights_gpu, d0.kv_gpu) == (100 + 200 + 300, 3 * 65536)
    assert (d1.weights_gpu, d1.kv_gpu) == (400 + 50, 65536)
    assert d0.compute_gpu == d1.compute_gpu == per_device
    assert d0.overhead_gpu == d1.overhead_gpu == 300 * MIB
    assert e.vram == (600 + 3 * 65536 + per_device + 300 * MIB, 450 + 65536 + per_device + 300 * MIB)
    assert e.ram_bytes == single.total_cpu
    # Weights and KV are only moved between devices; compute and overhead are paid once more per device.
    assert sum(e.vram) == single.total_gpu - single.compute_gpu + 2 * per_device + 300 * MIB


def test_unused_device_holds_nothing() -> None:
    e = estimate_split(toy(), EstimateParams(ctx=512), (1, 0, 1))
    assert e.layers == (3, 0, 2)
    assert e.devices[1].total_gpu == 0


def test_split_curve_matches_estimate_split() -> None:
    params = EstimateParams(ctx=1024, gpu_overhead=256 * MIB)
    curve = split_curve(toy(), params)
    for blocks in [(2, 2), (0, 4), (3, 1), (1, 1, 2), (4, 0)]:
        assert curve.devices(blocks) == estimate_split(toy(), params, tensor_split_for(blocks)).vram
    with pytest.raises(EstimateError):
        curve.devices((1, 1))


def test_declared_split_curve() -> None:
    mem = DeclaredMemory(vram=11 << 30, ram=1 << 30, layers=10)
    sc = declared_split_curve(mem, 512 * MIB)
    assert sc is not None
    # One device holding everything needs exactly the declared VRAM, as the single-GPU curve says.
    assert sc.devices((10,)) == (11 << 30,) == (declared_curve(mem, gpu_overhead=512 * MIB).vram(11),)
    # Two devices: the fixed 512 MiB twice.
    assert sum(sc.devices((5, 5))) == (11 << 30) + 512 * MIB
    assert declared_split_curve(DeclaredMemory(vram=1 << 30, ram=0)) is None
