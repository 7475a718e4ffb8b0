"""Issue 22 against real components: a homelab built by hand is imported, adopted, and its clients keep working.

On the session's private dockerd (nothing pulled: the llama-server and busybox images are assembled locally):

- `mark-i` and `mark-ii` are started the way people do by hand (`docker run --network host … llama-server
  --port P`), no homelab labels: mark-i reads its model through a bind mount of a host directory, mark-ii from a
  Docker volume the model was copied into with a throw-away container (the skill document's recipe);
- an Ollama (the project's stand-in, tests/support/ollama_standin.py) has two tags pulled by hand;
- a LiteLLM config and a llama-swap config are written by hand, llama-swap's in its documented format (its
  config.example.yaml and docs/kb/guides/routing/groups-and-matrix.md: macros, aliases as {id, name}, groups under
  routing.router.settings) and naming the same model files as the containers.

Then `homelab import` writes a spec that validates; the first plan adopts both containers on their ports (the
bind-mounted model flagged and copied into the model volume, the one in a volume read where it is), serves no model
twice; the apply replaces them; the second plan is empty; and the URLs the hand-written clients use answer a real
completion from the real llama-server. Each phase's time is printed (`-s`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from controller.core.state import LABEL_CLUSTER
from controller.drivers.docker import DockerEngine
from specs import parse_spec
from tests.support import dockerd as dockerd_support
from tests.support.ollama_standin import OllamaStandin
from tests.support.ports import free_port_range
from tests.support.wiring import Wired

SYNTH_NOT_TEXT = 261
"""tests/support/synth.py's vocabulary starts with 5 control tokens and 256 byte tokens; llama-server answers 500
to sampled output that is not text, so every completion keeps them out with a logit bias."""

HELPER_TAG = "busybox:latest"
"""The helper image an imported spec names (llamacpp.helper_image's default): the user's node has it."""


def complete(port: int, model: str) -> dict[str, object]:
    """A real completion from whatever listens on 127.0.0.1:PORT, the way a client configured by hand asks."""
    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={
            "model": model,
            "prompt": "hello",
            "max_tokens": 4,
            "logit_bias": [[t, False] for t in range(SYNTH_NOT_TEXT)],
        },
        timeout=60,
        trust_env=False,
    )
    r.raise_for_status()
    body: dict[str, object] = r.json()
    return body


def wait_health(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing healthy on 127.0.0.1:{port} after {timeout} s")
        time.sleep(0.1)


@pytest.fixture
def hand_built(
    dockerd: dockerd_support.Dockerd,
    docker_client: docker.DockerClient,
    busybox_image: str,
    llamacpp_image: str,
    small_gguf: Path,
    tmp_path: Path,
) -> Iterator[dict[str, object]]:
    """mark-i (bind mount) and mark-ii (volume), started by hand; removed afterwards with everything the test made."""
    started = time.monotonic()
    p1 = free_port_range(2)
    p2 = p1 + 1
    bind_dir = tmp_path / "srv-models"
    bind_dir.mkdir()
    shutil.copy(small_gguf, bind_dir / "qwen-chat.gguf")
    upload = tmp_path / "upload"
    upload.mkdir()
    shutil.copy(small_gguf, upload / "coder-1b.gguf")
    docker_client.images.get(busybox_image).tag(HELPER_TAG)
    common = ["--host", "127.0.0.1", "-c", "512", "-t", "1"]
    try:
        # The skill's recipe: a volume, the model copied into it by a throw-away container.
        docker_client.volumes.create("mark-ii-models")
        docker_client.containers.run(
            busybox_image,
            ["cp", "/src/coder-1b.gguf", "/models/"],
            volumes={"mark-ii-models": {"bind": "/models", "mode": "rw"}, str(upload): {"bind": "/src", "mode": "ro"}},
            remove=True,
        )
        docker_client.containers.run(
            llamacpp_image,
            ["-m", "/models/qwen-chat.gguf", "--port", str(p1), "-a", "qwen-chat", *common],
            name="mark-i",
            network_mode="host",
            volumes={str(bind_dir): {"bind": "/models", "mode": "ro"}},
            detach=True,
        )
        docker_client.containers.run(
            llamacpp_image,
            ["-m", "/models/coder-1b.gguf", "--port", str(p2), "-a", "coder-1b", *common],
            name="mark-ii",
            network_mode="host",
            volumes={"mark-ii-models": {"bind": "/models", "mode": "ro"}},
            detach=True,
        )
        wait_health(p1)
        wait_health(p2)
        setup = time.monotonic() - started
        yield {"p1": p1, "p2": p2, "bind_dir": bind_dir, "gguf": small_gguf, "setup_s": setup}
    finally:
        for container in docker_client.containers.list(all=True):
            container.remove(force=True)
        for volume in docker_client.volumes.list():
            volume.remove(force=True)
        docker_client.images.remove(HELPER_TAG)


def test_import_adopt_and_the_old_urls_still_answer(
    hand_built: dict[str, object],
    dockerd: dockerd_support.Dockerd,
    docker_client: docker.DockerClient,
    tmp_path: Path,
    wired: Wired,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p1, p2 = int(hand_built["p1"]), int(hand_built["p2"])  # type: ignore[call-overload]
    gguf = Path(str(hand_built["gguf"]))
    timings: list[tuple[str, float]] = [("mark-i, mark-ii started by hand, healthy", float(str(hand_built["setup_s"])))]
    t0 = time.monotonic()
    with OllamaStandin({"llama3.2:1b": gguf, "qwen2.5:0.5b": gguf}) as ollama:
        for tag in ("llama3.2:1b", "qwen2.5:0.5b"):
            ollama.add_local(tag)  # pulled by hand before homelab
        litellm = tmp_path / "litellm.yaml"
        litellm.write_text(
            json.dumps(
                {
                    "model_list": [
                        {
                            "model_name": "chat",
                            "litellm_params": {
                                "model": "openai/qwen-chat",
                                "api_base": f"http://127.0.0.1:{p1}/v1",
                                "api_key": "none",
                            },
                        },
                        {
                            "model_name": "coder",
                            "litellm_params": {
                                "model": "openai/coder-1b",
                                "api_base": f"http://127.0.0.1:{p2}/v1",
                                "api_key": "none",
                            },
                        },
                        {
                            "model_name": "small",
                            "litellm_params": {"model": "ollama_chat/llama3.2:1b", "api_base": ollama.url},
                        },
                    ],
                    "router_settings": {"fallbacks": [{"coder": ["chat"]}]},
                    "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
                }
            )
        )
        swap = tmp_path / "llama-swap.yaml"
        swap.write_text(
            "macros:\n"
            '  "server": "/usr/local/bin/llama-server --port ${PORT} -t 1"\n'
            "models:\n"
            '  "qwen-chat":\n'
            "    cmd: |\n"
            "      ${server}\n"
            "      --model /srv/models/qwen-chat.gguf\n"
            "      --ctx-size 512\n"
            "    aliases:\n"
            '      - id: "gpt-4o-mini"\n'
            '        name: "gpt-4o-mini"\n'
            '  "coder-1b":\n'
            "    cmd: ${server} -m /srv/models/coder-1b.gguf -c 512\n"
            "    ttl: 300\n"
            "routing:\n"
            "  router:\n"
            "    use: group\n"
            "    settings:\n"
            "      groups:\n"
            "        coding: {swap: false, exclusive: false, members: [coder-1b]}\n"
        )
        monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
        wired.set(connect=lambda spec: lambda node: DockerEngine(node, spec.cluster.name, poll_interval=0.05))
        timings.append(("Ollama with 2 tags, LiteLLM and llama-swap configs", time.monotonic() - t0))

        # 1. import: a spec that validates, every container adopted on its port.
        t = time.monotonic()
        spec_path = tmp_path / "cluster.yaml"
        code, _, err = wired.run(
            "import", "--from-docker", f"box={dockerd.url}", "--from-ollama", f"box={ollama.url}",
            "--litellm", str(litellm), "--llama-swap", str(swap), "-o", str(spec_path), "--cluster", "adopted",
        )  # fmt: skip
        assert code == 0, err
        text = spec_path.read_text()
        spec = parse_spec(text, spec_path).spec
        code, _, err = wired.run("validate", "-f", str(spec_path))
        assert code == 0, err
        timings.append(("homelab import + validate", time.monotonic() - t))
        by_name = {m.name: m for m in spec.models}
        assert sorted(by_name) == ["coder-1b", "llama3.2-1b", "qwen-chat", "qwen2.5-0.5b"]  # no file twice
        chat, coder = by_name["qwen-chat"], by_name["coder-1b"]
        assert (chat.adopt, chat.port, chat.source.volume) == ("mark-i", p1, None)
        assert chat.source.gguf == str(Path(str(hand_built["bind_dir"])) / "qwen-chat.gguf")
        assert (coder.adopt, coder.port, coder.source.volume, coder.source.volume_path) == (
            "mark-ii",
            p2,
            "mark-ii-models",
            "coder-1b.gguf",
        )
        assert by_name["llama3.2-1b"].source.ollama == "llama3.2:1b"
        node = spec.node("box")
        assert node.llamacpp is not None and (node.llamacpp.bind_address, node.llamacpp.threads) == ("127.0.0.1", 1)
        assert "  # also llama-swap model coder-1b (group coding)" in text
        assert "LiteLLM serves it as coder" in text and "fallback: chat  # guessed from LiteLLM's fallback" in text

        # 2. The first plan adopts both, on the same ports; the bind-mounted model is flagged and copied.
        t = time.monotonic()
        code, out, err = wired.run("reconcile", "--dry-run", "-f", str(spec_path))
        assert code == 2, out + err
        timings.append(("first plan", time.monotonic() - t))
        assert (
            f"  ~ adopt container mark-i → homelab-qwen-chat (same port {p1}); its model is read through a bind"
            f" mount of {hand_built['bind_dir']} (slow and fragile on Windows Docker hosts): copied into the model"
            " volume homelab-models"
        ) in out, out
        assert (
            f"  ~ adopt container mark-ii → homelab-coder-1b (same port {p2}); its model stays in Docker volume"
            " mark-ii-models (mounted read-only, not copied)"
        ) in out, out
        assert "file homelab-models/qwen-chat.gguf" in out and "coder-1b.gguf" not in out.split("adopt container")[0]
        assert "homelab/llama3.2-1b" in out and "homelab/qwen2.5-0.5b" in out

        # 3. Apply, then nothing is left to do.
        t = time.monotonic()
        code, out, err = wired.run("reconcile", "--yes", "-f", str(spec_path))
        assert code == 0, out + err
        timings.append(("apply (adopt 2, copy 1 file, 2 Ollama models)", time.monotonic() - t))
        done = [line.split(" ...")[0] for line in out.splitlines() if line.endswith(" ...")]
        # The hand-started containers serve until the file is copied; then each is replaced, health-gated.
        assert done.index("box: copy-file homelab-models/qwen-chat.gguf") < done.index("box: adopt-container mark-i")
        assert done[-6:] == [
            "box: adopt-container mark-i",
            "box: adopt-container mark-ii",
            "box: run-container homelab-coder-1b",
            "box: wait-healthy homelab-coder-1b",
            "box: run-container homelab-qwen-chat",
            "box: wait-healthy homelab-qwen-chat",
        ], out
        t = time.monotonic()
        code, out, err = wired.run("reconcile", "--dry-run", "-f", str(spec_path))
        timings.append(("second plan", time.monotonic() - t))
        assert code == 0 and "No changes. The cluster matches the spec." in out, out + err

        # Each model file is served by exactly one container: the managed one, on the old port.
        every = {c.name: c for c in docker_client.containers.list(all=True)}
        running = {name: c for name, c in every.items() if c.status == "running"}
        assert sorted(running) == ["homelab-coder-1b", "homelab-qwen-chat"]
        # The hand-started ones are kept, stopped and renamed, restart policy off: the user can go back.
        for kept in ("mark-i-adopted-by-homelab", "mark-ii-adopted-by-homelab"):
            assert every[kept].status == "exited" and every[kept].attrs["HostConfig"]["RestartPolicy"]["Name"] == "no"
        mounts = {name: c.attrs["Mounts"] for name, c in running.items()}
        assert [(m["Type"], m["Name"], m["RW"]) for m in mounts["homelab-coder-1b"]] == [
            ("volume", "mark-ii-models", False)
        ]
        assert [(m["Type"], m["Name"]) for m in mounts["homelab-qwen-chat"]] == [("volume", "homelab-models")]
        volumes = {v.name: v for v in docker_client.volumes.list()}
        assert LABEL_CLUSTER not in (volumes["mark-ii-models"].attrs.get("Labels") or {})  # never made homelab's
        files = DockerEngine(node, "adopted").list_files("homelab-models")
        assert [f.name for f in files] == ["qwen-chat.gguf"]  # only the bind-mounted model was copied
        tags = httpx.get(f"{ollama.url}/api/tags", timeout=5, trust_env=False).json()["models"]
        assert {"llama3.2:1b", "qwen2.5:0.5b"} <= {m["name"] for m in tags}  # hand-pulled tags stay

        # 4. The URLs the hand-written LiteLLM config names still answer, from the real llama-server.
        t = time.monotonic()
        for port, alias in ((p1, "qwen-chat"), (p2, "coder-1b")):
            body = complete(port, alias)
            assert body["object"] == "text_completion" and body["model"] == alias, body
        timings.append(("completions on the old URLs", time.monotonic() - t))
    print()
    for what, seconds in timings:
        print(f"  {what:<52} {seconds:6.2f} s")
