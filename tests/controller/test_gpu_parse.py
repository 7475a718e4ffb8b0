"""Parsing nvidia-smi: the real H100 captures in tests/data/nvidia-smi/, and malformed variants."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from controller.drivers.base import BadOutput
from controller.drivers.gpu import parse_amount, parse_gpus, parse_meminfo, parse_processes
from tests.support.nvidia_smi import fixture

MIB = 2**20
UUID = "GPU-1ea1fc07-69c3-37aa-17cf-8a81ad018c96"


def test_query_gpu_busy() -> None:
    (gpu,) = parse_gpus(fixture("query-gpu-busy.csv"))
    assert (gpu.index, gpu.name, gpu.uuid, gpu.driver, gpu.bus_id) == (
        0,
        "NVIDIA H100 80GB HBM3",
        UUID,
        "580.159.04",
        "00000000:00:06.0",
    )
    assert (gpu.total_bytes, gpu.used_bytes, gpu.free_bytes) == (81559 * MIB, 6671 * MIB, 74409 * MIB)


def test_query_gpu_idle() -> None:
    (gpu,) = parse_gpus(fixture("query-gpu-idle.csv"))
    assert (gpu.used_bytes, gpu.free_bytes) == (0, 81079 * MIB)


def test_query_apps() -> None:
    (proc,) = parse_processes(fixture("query-apps-busy.csv"))
    assert (proc.pid, proc.name, proc.used_bytes, proc.gpu_uuid) == (422, "python3", 6662 * MIB, UUID)
    assert parse_processes(fixture("query-apps-idle.csv")) == ()  # header only: no processes


def test_noheader_nounits_form_reads_the_same() -> None:
    """What production asks for (--format=csv,noheader,nounits), made from the captures as nvidia-smi documents."""
    for name, parse in (("query-gpu-busy.csv", parse_gpus), ("query-apps-busy.csv", parse_processes)):
        text = fixture(name)
        bare = "\n".join(text.splitlines()[1:]).replace(" MiB", "") + "\n"
        assert parse(bare) == parse(text)


def test_real_noheader_nounits_capture() -> None:
    """The production queries as a real nvidia-smi answered them, while a Vulkan llama-server ran."""
    (gpu,) = parse_gpus(fixture("query-gpu-vulkan-nounits.csv"))
    uuid = "GPU-7551ba04-893a-8905-ea5b-edfa2b358509"
    assert (gpu.index, gpu.name, gpu.uuid, gpu.driver) == (0, "NVIDIA H100 80GB HBM3", uuid, "580.159.04")
    assert (gpu.total_bytes, gpu.used_bytes, gpu.free_bytes) == (81559 * MIB, 65 * MIB, 81015 * MIB)
    (proc,) = parse_processes(fixture("query-apps-vulkan-nounits.csv"))
    assert (proc.pid, proc.name, proc.used_bytes, proc.gpu_uuid) == (552, "/tmp/lsv/bin/llama-server", 33 * MIB, uuid)


def test_the_xml_and_plain_captures_agree_with_the_csv() -> None:
    """`nvidia-smi -q -x` and plain `nvidia-smi` of the same moment: the same GPU, memory and process."""
    (gpu,) = parse_gpus(fixture("query-gpu-busy.csv"))
    (proc,) = parse_processes(fixture("query-apps-busy.csv"))
    root = ET.fromstring(fixture("nvidia-smi-q-busy.xml").split("\n", 2)[2])  # skip the DOCTYPE's DTD lookup
    node = root.find("gpu")
    assert node is not None
    assert node.findtext("uuid") == gpu.uuid and node.findtext("product_name") == gpu.name
    assert root.findtext("driver_version") == gpu.driver
    assert parse_amount(node.findtext("fb_memory_usage/total") or "") == gpu.total_bytes
    info = node.find("processes/process_info")
    assert info is not None
    assert int(info.findtext("pid") or 0) == proc.pid
    assert parse_amount(info.findtext("used_memory") or "") == proc.used_bytes
    plain = fixture("nvidia-smi-busy.txt")
    m = re.search(r"(\d+)MiB /\s+(\d+)MiB", plain)
    assert m is not None and int(m[1]) * MIB == gpu.used_bytes and int(m[2]) * MIB == gpu.total_bytes
    assert proc.used_bytes is not None
    assert re.search(rf"\b{proc.pid}\b.*{proc.name}\s+{proc.used_bytes // MIB}MiB", plain)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("81559 MiB", 81559 * MIB),
        ("81559", 81559 * MIB),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("512 KiB", 512 * 1024),
        ("[N/A]", None),
        ("N/A", None),
        ("[Not Supported]", None),
        ("[Insufficient Permissions]", None),
        ("", None),
    ],
)
def test_amounts(text: str, expected: int | None) -> None:
    assert parse_amount(text) == expected


def test_unknown_memory_reads_as_none() -> None:
    (gpu,) = parse_gpus("0, NVIDIA A100, GPU-x, [N/A], [N/A], [N/A], 550.1, 0:1\n")
    assert gpu.total_bytes is None and gpu.used_bytes is None
    (proc,) = parse_processes("77, llama-server, [N/A], MIG-5f0c\n")  # MIG: per-process memory not given
    assert proc.used_bytes is None and proc.gpu_uuid == "MIG-5f0c"


def test_several_gpus_sorted_and_blank_lines_skipped() -> None:
    text = "1, RTX 3060, GPU-b, 12288, 0, 12000, 550.1, 0:2\n\n0, RTX 3090, GPU-a, 24576, 0, 24000, 550.1, 0:1\n"
    assert [g.index for g in parse_gpus(text)] == [0, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("garbage\n", "line 1: expected 8 fields, got 1"),
        ("x, A, GPU-a, 1, 1, 1, d, b\n", "GPU index 'x' is not a number"),
        ("0, A, GPU-a, lots, 1, 1, d, b\n", "not a memory amount: 'lots'"),
        ("0, A, GPU-a, 1, 1, 1, d, b\n0, B, GPU-b, 1, 1, 1, d, b\n", "a GPU index appears twice"),
    ],
)
def test_malformed_gpu_lines(text: str, message: str) -> None:
    with pytest.raises(BadOutput, match=re.escape(message)) as info:
        parse_gpus(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("422, python3\n", "expected 4 fields, got 2"),
        ("pid?, python3, 1 MiB, GPU-a\n", "pid 'pid?' is not a number"),
        ("422, python3, 12 parsecs, GPU-a\n", "not a memory amount"),
    ],
)
def test_malformed_process_lines(text: str, message: str) -> None:
    with pytest.raises(BadOutput, match=re.escape(message)):
        parse_processes(text)


def test_old_driver_no_processes_message() -> None:
    assert parse_processes("No running processes found\n") == ()


def test_meminfo() -> None:
    assert parse_meminfo("MemTotal:       65758372 kB\nMemFree: 1 kB\n") == 65758372 * 1024
    with pytest.raises(BadOutput):
        parse_meminfo("nothing here")
