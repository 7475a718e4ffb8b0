"""Issue 29: a corrupt state file (watch.json, power.json, measured.json, recovery.json, events.jsonl) is
reported once, set aside and read as absent — never a traceback in `status`, `wake`, `place` or
`reconcile --dry-run`, never `Infinity` in /api/status.

The cases are generated: wrong types at each level, NaN, Infinity, 1e999, 10**400, truncated, binary, empty.
Before the fix, 1e999 or 10**400 where a time or a count is read gave OverflowError or TypeError tracebacks
(Python's `json` accepts them), and one `{"time": 1e999}` line in events.jsonl broke every status page."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from controller.core.status_page import render_main
from controller.drivers.fake import FakeDockerNode
from controller.effects import calibration, statefile
from controller.effects.apply import EVENTS_FILE
from controller.effects.power import STATE_FILE as POWER_FILE
from controller.effects.power import PowerStore
from controller.effects.recovery import STATE_FILE as RECOVERY_FILE
from controller.effects.recovery import AttemptStore
from controller.effects.status_api import read_events
from controller.effects.watch import STATUS_FILE, read_status
from specs.model import ClusterSpec
from tests.controller.test_reconcile import SOURCES, SPEC
from tests.support.wiring import Wired

HUGE = "1" + "0" * 400
WAKE_SPEC = SPEC.replace(
    '    llamacpp: {image: "llama:test", ports: 3100-3109}\n',
    '    llamacpp: {image: "llama:test", ports: 3100-3109}\n    wake: {command: "true"}\n',
)


def good_files() -> dict[str, object]:
    now = 1_700_000_000.0
    return {
        STATUS_FILE: {
            "pid": 1, "source": {"mode": "file", "path": "c.yaml"}, "applied": {"spec_hash": "h", "commit": "c"},
            "last_run": {"time": now, "trigger": "interval", "plan": {"summary": {"add": 0}}, "ok": True},
            "health": {"verdict": "HEALTHY", "nodes": {"box": "up"}}, "spec_errors": [],
            "power": {"spare": {"state": "awake", "idle_s": 3.0, "since": now}}, "next_run": now, "updated": now,
        },
        POWER_FILE: {"spare": {"state": "asleep", "since": now, "reason": "idle"}},
        calibration.MEASURED_FILE: {"version": 1, "measurements": []},
        RECOVERY_FILE: {"box": {"status": "backoff", "attempts": 0, "next_retry": now, "reason": "", "spec_hash": "h"}},
    }  # fmt: skip


def corrupt(value: object) -> list[tuple[str, str]]:
    """(label, text) variants of a good JSON value: each scalar replaced by bad ones, each container by the
    wrong kind, and whole-file damage."""
    out: list[tuple[str, str]] = []
    text = json.dumps(value)

    def walk(v: object, path: list[object]) -> None:
        for bad_label, bad in (("NaN", "NaN"), ("inf", "Infinity"), ("1e999", "1e999"), ("10**400", HUGE),
                               ("str", '"x"'), ("list", "[1]"), ("obj", '{"a": 1}'), ("neg", "-1e300")):  # fmt: skip
            marker = "\u0000MARK\u0000"
            out.append(
                (
                    f"{'.'.join(map(str, path)) or 'top'}={bad_label}",
                    json.dumps(put(value, path, marker)).replace(json.dumps(marker), bad),
                )
            )
        if isinstance(v, dict):
            for k, item in v.items():
                walk(item, [*path, k])
        elif isinstance(v, list):
            for i, item in enumerate(v):
                walk(item, [*path, i])

    walk(value, [])
    out += [("truncated", text[: len(text) // 2]), ("empty", ""), ("binary", "\x00\x01\x02\xff"),
            ("nul-json", "null"), ("list", "[]")]  # fmt: skip
    return out


def put(value: object, path: list[object], new: object) -> object:
    if not path:
        return new
    copy = json.loads(json.dumps(value))
    target = copy
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = new
    return copy


def cases() -> list[tuple[str, str, str]]:
    return [(name, label, text) for name, value in good_files().items() for label, text in corrupt(value)]


@pytest.mark.parametrize(("name", "label", "text"), cases(), ids=[f"{n}:{lab}" for n, lab, _ in cases()])
def test_each_reader_survives_a_corrupt_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, label: str, text: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    # no reader raises; what it returns is usable (finite numbers where it does arithmetic)
    status = read_status(tmp_path)
    PowerStore(tmp_path).load()
    measured = calibration.read(tmp_path)
    AttemptStore(tmp_path / RECOVERY_FILE).load()
    if status is not None:
        json.dumps(status, allow_nan=False)
    for m in measured:
        assert m.ram_bytes is None or m.ram_bytes >= 0
    err = capsys.readouterr().err
    if path.exists():  # read as good: the same text again gives the same, and nothing was said
        assert err == "", err
    else:  # reported once, in one line naming the file, and set aside
        [line] = err.splitlines()
        assert str(path) in line and "set aside" in line, line
        assert len(list(tmp_path.glob(f"{name}.corrupt-*"))) == 1
        for _ in range(2):
            read_status(tmp_path), PowerStore(tmp_path).load(), calibration.read(tmp_path)
        assert capsys.readouterr().err == ""


def test_the_good_files_are_read_as_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in good_files().items():
        (tmp_path / name).write_text(json.dumps(value))
    assert read_status(tmp_path) is not None and PowerStore(tmp_path).load()
    assert AttemptStore(tmp_path / RECOVERY_FILE).load() and calibration.read(tmp_path) == []
    assert capsys.readouterr().err == "" and not list(tmp_path.glob("*.corrupt-*"))


def test_a_bad_event_line_is_skipped_and_the_page_still_renders(tmp_path: Path) -> None:
    lines = [
        '{"time": 1e999, "event": "x"}', '{"time": NaN}', '{"time": Infinity}', f'{{"time": {HUGE}}}',
        '{"time": "noon", "event": "y"}', '{"event": ["a"]}', "[1, 2]", "\x00\x01", '{"time": 1700000000',
        '{"time": 1e300, "event": "far"}', '{"time": 1700000000.5, "event": "good", "node": "box"}',
    ]  # fmt: skip
    (tmp_path / EVENTS_FILE).write_text("\n".join(lines) + "\n")
    events = read_events(tmp_path)
    assert [e.get("event") for e in events] == ["good"]
    json.dumps(events, allow_nan=False)
    page = render_main({"events": events, "nodes": {}, "spec": {}})
    assert "good" in page


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wired: Wired) -> Path:
    fakes = {n: FakeDockerNode(n, images={"llama:test"}, source_files=dict(SOURCES)) for n in ("box", "spare")}

    def factory(spec: ClusterSpec) -> object:
        return lambda node: fakes[node.name]

    wired.set(connect=factory, gpu_probe=lambda nodes: {}, health_check=lambda url, timeout, cancelled: None)
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "cluster.yaml").write_text(WAKE_SPEC)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "state"


COMMAND_CASES = [
    (name, label, text)
    for name, label, text in cases()
    if label in ("truncated", "binary")
    or label.endswith(("=1e999", "=10**400"))
    or label
    in (
        "last_run.time=1e999",
        "next_run=10**400",
        "applied.commit=list",
        "power.spare.since=NaN",
        "spare.since=10**400",
        "spare=str",
        "measurements=obj",
        "box.attempts=1e999",
        "box.next_retry=10**400",
    )
]


@pytest.mark.parametrize(("name", "label", "text"), COMMAND_CASES, ids=[f"{n}:{x}" for n, x, _ in COMMAND_CASES])
def test_commands_survive_a_corrupt_state_file(lab: Path, wired: Wired, name: str, label: str, text: str) -> None:
    # (`wake` reads power.json through the same PowerStore.load; a whole wake waits for SSH, too slow here)
    for args in (["status"], ["status", "--json"], ["place"], ["reconcile", "--dry-run"]):
        lab.mkdir(exist_ok=True)
        (lab / name).write_text(text, encoding="utf-8")
        r = wired.invoke(args)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
        assert "Traceback" not in r.output, r.output
        if args == ["status", "--json"] and r.exit_code == 0:
            data = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"{c} in /api/status"))
            assert not any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(data))


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [value]


def test_set_aside_names_the_file(tmp_path: Path) -> None:
    said: list[str] = []
    (tmp_path / "x.json").write_text("{")
    assert statefile.read_json(tmp_path / "x.json", {}, said.append) is None
    [line] = said
    assert line.startswith(f"{tmp_path / 'x.json'}: not a state file homelab can read (not JSON")
