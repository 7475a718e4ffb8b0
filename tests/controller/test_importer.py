"""`homelab import`'s pure part: docker inspect, Ollama, LiteLLM and llama-swap facts → a spec that validates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.commands.common import err
from controller.core.importer import (
    DockerFacts,
    ImportError_,
    OllamaFacts,
    build_spec,
    container_ports,
    litellm_routes,
    model_mount,
    parse_server_args,
)
from specs import SpecError
from specs.load import parse_spec
from tests.support.wiring import Wired


def inspect(
    name: str,
    argv: list[str],
    *,
    mounts: list[dict[str, Any]],
    network: str = "host",
    ports: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "Name": "/" + name,
        "Path": argv[0],
        "Args": argv[1:],
        "Config": {"Image": "ghcr.io/ggml-org/llama.cpp:server", "Labels": {}},
        "State": {"Status": "running"},
        "HostConfig": {"NetworkMode": network, "PortBindings": ports or {}},
        "Mounts": mounts,
    }


BIND = {"Type": "bind", "Source": "/srv/models", "Destination": "/models", "RW": False}
VOLUME = {"Type": "volume", "Name": "llm", "Source": "/var/lib/docker/volumes/llm/_data", "Destination": "/data"}

MARK_I = inspect(
    "mark-i",
    ["/app/llama-server", "-m", "/models/Qwen2.5-14B-Instruct-Q4_K_M.gguf", "--port", "3009", "--host", "0.0.0.0",
     "-c", "16384", "-ngl", "99", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on", "-a", "qwen2.5-14b-instruct",
     "--jinja", "-t", "8"],
    mounts=[BIND],
)  # fmt: skip
MARK_II = inspect(
    "mark-ii",
    ["llama-server", "--model=/data/coder/qwen2.5-coder-7b.gguf", "-c8192", "-ngl", "0", "--port", "8080"],
    mounts=[VOLUME],
    network="bridge",
    ports={"8080/tcp": [{"HostIp": "", "HostPort": "3010"}]},
)
MANAGED = {**MARK_I, "Name": "/homelab-x", "Config": {"Image": "i", "Labels": {"homelab.cluster": "lab"}}}
NOT_LLAMA = inspect("postgres", ["postgres"], mounts=[])

LITELLM = {
    "model_list": [
        {
            "model_name": "chat",
            "litellm_params": {"model": "openai/qwen2.5-14b-instruct", "api_base": "http://h:3009/v1"},
        },
        {"model_name": "coder", "litellm_params": {"model": "openai/x", "api_base": "http://h:3010/v1"}},
    ],
    "router_settings": {"fallbacks": [{"coder": ["chat"]}]},
}
SWAP = {
    "models": {
        "llama-8b": {"cmd": "llama-server --port ${PORT} -m /srv/models/llama-3.1-8b.gguf --ctx-size 8192 --jinja",
                     "aliases": ["gpt-4o-mini"], "ttl": 300},
        "qwen-14b": {"cmd": "llama-server --port ${PORT} -m /srv/models/Qwen2.5-14B-Instruct-Q4_K_M.gguf"},
        "vllm": {"cmd": "docker run --rm vllm/vllm-openai", "proxy": "http://127.0.0.1:9000"},
    },
    "groups": {"fast": {"swap": True, "exclusive": False, "members": ["llama-8b"]}},
}  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["llama-server", "-m", "/m.gguf"], "model", "/m.gguf"),
        (["-m", "/m.gguf", "--ctx-size", "4096"], "context", 4096),
        (["-m", "/m.gguf", "-c8192"], "context", 8192),
        (["-m", "/m.gguf", "--n-gpu-layers", "33"], "gpu_layers", 33),
        (["-m", "/m.gguf", "--port=3009"], "port", 3009),
        (["-m", "/m.gguf", "-fa"], "flash_attn", True),
        (["-m", "/m.gguf", "-fa", "off"], "flash_attn", False),
        (["-m", "/m.gguf", "-fa", "on", "--jinja"], "args", ("--jinja",)),
        (["-m", "/m.gguf", "-a", "x", "--temp", "0.7"], "args", ("--temp", "0.7")),
        (["-m", "/m.gguf", "-t", "8", "-ts", "1,1"], "dropped", ("-t 8", "-ts 1,1")),
        (["-m", "/m.gguf", "-ctk", "q4_0"], "cache_k", "q4_0"),
    ],
)
def test_server_args(argv: list[str], field: str, value: object) -> None:
    assert getattr(parse_server_args(argv), field) == value


def test_mounts_map_the_model_back_to_its_source() -> None:
    bind = model_mount(MARK_I, "/models/Qwen2.5-14B-Instruct-Q4_K_M.gguf")
    assert bind is not None and (bind.kind, bind.host_path) == ("bind", "/srv/models/Qwen2.5-14B-Instruct-Q4_K_M.gguf")
    vol = model_mount(MARK_II, "/data/coder/qwen2.5-coder-7b.gguf")
    assert vol is not None and (vol.kind, vol.name, vol.inner) == ("volume", "llm", "coder/qwen2.5-coder-7b.gguf")
    assert model_mount(MARK_I, "/elsewhere/m.gguf") is None
    assert container_ports(MARK_I) == [3009] and container_ports(MARK_II) == [3010]


def _spec(**kwargs: Any) -> Any:
    text = build_spec("lab", **kwargs)
    return text, parse_spec(text).spec


def test_docker_containers_become_adopting_models() -> None:
    facts = DockerFacts("gpu1", "127.0.0.1", "unix:///var/run/docker.sock", [MARK_II, MARK_I, MANAGED, NOT_LLAMA])
    text, spec = _spec(docker=[facts])
    assert [m.name for m in spec.models] == ["qwen2.5-14b-instruct", "qwen2.5-coder-7b"]
    qwen, coder = spec.models
    assert (qwen.adopt, qwen.port, qwen.context, qwen.kv_cache.value, qwen.args) == (
        "mark-i",
        3009,
        16384,
        "q8_0",
        ["--jinja"],
    )
    assert qwen.source.gguf == "/srv/models/Qwen2.5-14B-Instruct-Q4_K_M.gguf" and qwen.source.node == "gpu1"
    assert (coder.adopt, coder.port, coder.context, coder.placement.cpu_only) == ("mark-ii", 3010, 8192, True)
    assert coder.source.gguf == "/var/lib/docker/volumes/llm/_data/coder/qwen2.5-coder-7b.gguf"
    # The model in a volume is read there (no copy); the one through a bind mount is flagged and copied.
    assert (coder.source.volume, coder.source.volume_path) == ("llm", "coder/qwen2.5-coder-7b.gguf")
    assert qwen.source.volume is None
    assert "# from container mark-i on gpu1 (running, image ghcr.io/ggml-org/llama.cpp:server)" in text
    assert (
        "bind mount of /srv/models (slow and fragile on Windows Docker hosts): it is copied into the model volume"
        in text
    )
    assert "model coder/qwen2.5-coder-7b.gguf in Docker volume llm: read there, not copied" in text
    assert "-t 8" in text and "categories: [code]  # guessed from its names" in text
    node = spec.node("gpu1")
    assert node.llamacpp is not None and 3009 in node.llamacpp.ports and 3010 in node.llamacpp.ports
    # mark-i listens on 0.0.0.0 with -t 8, mark-ii gives neither: nothing they agree on is carried to the node.
    assert (node.llamacpp.bind_address, node.llamacpp.threads) == ("0.0.0.0", None)
    assert "llamacpp.bind_address" not in text and "llamacpp.threads" not in text


def test_the_node_takes_the_host_and_threads_every_hand_started_container_gives() -> None:
    argv = ["/app/llama-server", "-m", "/models/a.gguf", "--host", "127.0.0.1", "-t", "1"]
    a = inspect("a", [*argv, "--port", "3001"], mounts=[BIND])
    b = inspect("b", [*argv, "--port", "3002"], mounts=[BIND])
    b["Args"][2] = "/models/b.gguf"
    text, spec = _spec(docker=[DockerFacts("n", "127.0.0.1", "unix:///x", [a, b])])
    rt = spec.node("n").llamacpp
    assert rt is not None and (rt.bind_address, rt.threads) == ("127.0.0.1", 1)
    assert "# llamacpp.bind_address: the --host of every container started by hand here" in text


def test_a_volume_of_another_driver_is_copied() -> None:
    nfs = {"Type": "volume", "Name": "nfs", "Source": "/mnt/nfs-models", "Destination": "/data"}
    c = inspect("c", ["llama-server", "-m", "/data/m.gguf"], mounts=[nfs])
    text, spec = _spec(docker=[DockerFacts("n", "127.0.0.1", "unix:///x", [c])])
    (m,) = spec.models
    assert m.source.volume is None and m.source.gguf == "/mnt/nfs-models/m.gguf"
    assert "whose mountpoint is not …/nfs/_data (another volume driver): it is copied" in text


def test_ollama_litellm_and_llama_swap() -> None:
    facts = DockerFacts("gpu1", "127.0.0.1", "unix:///var/run/docker.sock", [MARK_I, MARK_II])
    ollama = OllamaFacts(
        "gpu1", "127.0.0.1", "http://127.0.0.1:11434", [("qwen2.5:14b", 8192), ("homelab/x:latest", 1)]
    )
    text, spec = _spec(docker=[facts], ollama=[ollama], litellm=LITELLM, llama_swap=SWAP)
    names = [m.name for m in spec.models]
    # qwen-14b of llama-swap is the file mark-i serves: not served twice; vllm is not a llama-server.
    assert names == ["qwen2.5-14b-instruct", "qwen2.5-coder-7b", "llama-8b", "qwen2.5-14b"]
    llama8 = spec.model("llama-8b")
    assert llama8.adopt is None and llama8.context == 8192 and llama8.args == ["--jinja"]
    assert spec.model("qwen2.5-14b").source.ollama == "qwen2.5:14b" and spec.model("qwen2.5-14b").context == 8192
    assert "# from llama-swap model llama-8b (group fast)" in text
    assert "  # also llama-swap model qwen-14b\n" in text  # merged into mark-i's model, which it names
    assert "LiteLLM serves it as coder" in text
    routing = spec.routing.categories
    assert routing["code"].models == ["qwen2.5-coder-7b"]
    assert routing["code"].fallback is not None and routing["code"].fallback.value == "chat"
    assert "fallback: chat  # guessed from LiteLLM's fallback coder → chat" in text
    assert spec.node("gpu1").ollama is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "nothing to import"),
        ({"litellm": {"model_list": "x"}, "ollama": [OllamaFacts("n", "127.0.0.1", "http://127.0.0.1:1", [])]},
         "`model_list` must be a list"),
        ({"llama_swap": {"models": {"a": {"proxy": "x"}}},
          "docker": [DockerFacts("n", "127.0.0.1", "unix:///x", [])]}, "models.a: needs `cmd`"),
        ({"llama_swap": {"models": {}}}, "needs a --from-docker node"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ImportError_, match=message):
        build_spec("lab", **kwargs)


def test_cli_writes_a_valid_spec_and_never_overwrites(wired: Wired, tmp_path: Path) -> None:
    from controller.drivers.fake import FakeDockerNode

    fake = FakeDockerNode("gpu1", inspected={"mark-i": MARK_I, "mark-ii": MARK_II})
    wired.set(connect=lambda spec: lambda node: fake)
    out = tmp_path / "cluster.yaml"
    swap = tmp_path / "swap.yaml"
    swap.write_text("models:\n  a: {cmd: 'llama-server -m /srv/a.gguf --port ${PORT}'}\n")
    code, _, stderr = wired.run("import", "--from-docker", "gpu1=unix:///var/run/docker.sock", "--llama-swap",
                                str(swap), "-o", str(out))  # fmt: skip
    assert code == 0, stderr
    spec = parse_spec(out.read_text()).spec
    assert [m.adopt for m in spec.models] == ["mark-i", "mark-ii", None]
    code, _, stderr = wired.run("import", "--from-docker", "gpu1=unix:///x", "-o", str(out))
    assert code == 1 and "exists; give --force" in stderr
    code, _, stderr = wired.run("import", "--from-docker", "gpu1=unix:///x", "-o", str(out), "--force")
    assert code == 0 and (tmp_path / "cluster.yaml.bak").exists()
    swap.write_text("models:\n  a: [unclosed\n")
    code, _, stderr = wired.run("import", "--from-docker", "gpu1=unix:///x", "--llama-swap", str(swap), "-o",
                                str(out), "--force")  # fmt: skip
    assert code == 1 and stderr.count("\n") == 1 and f"{swap}:3:1:" in stderr, stderr


# llama-swap's current format (its config.example.yaml and docs/kb/guides/routing/groups-and-matrix.md): macros,
# aliases as {id, name}, groups under routing.router.settings, a matrix of sets over `vars`.
SWAP_CURRENT = {
    "macros": {"server": "/opt/llama/llama-server --port ${PORT}", "ctx": 4096, "args": "--ctx-size ${ctx}"},
    "models": {
        "coder-7b": {
            "macros": {"ctx": 16384},
            "cmd": "${server}\n# the model\n--model /srv/models/qwen2.5-coder-7b.gguf\n--ctx-size ${ctx} -ctk q8_0",
            "aliases": [{"id": "gpt-4o-mini", "name": "gpt-4o-mini", "unlisted": False}],
        },
        "embed": {
            "cmd": "${server} -m /srv/models/nomic-embed.gguf ${args} --embedding",
            "proxy": "http://127.0.0.1:9100",
        },
        "docker-llama": {
            "proxy": "http://127.0.0.1:${PORT}",
            "cmd": "docker run --name ${MODEL_ID} --rm -p ${PORT}:8080 ghcr.io/ggml-org/llama.cpp:server"
            " --model '/models/q.gguf'",
        },
        "relative": {"cmd": "llama-server --port ${PORT} -m path/to/m.gguf"},
    },
    "routing": {
        "router": {"use": "group", "settings": {"groups": {"coding": {"swap": True, "members": ["coder-7b"]}}}}
    },
    "matrix": {"vars": {"e": "embed"}, "sets": {"always": "e"}},
}


def test_llama_swap_current_format() -> None:
    facts = DockerFacts("gpu1", "127.0.0.1", "unix:///x", [])
    text, spec = _spec(docker=[facts], llama_swap=SWAP_CURRENT)
    assert [m.name for m in spec.models] == ["coder-7b", "embed"]
    coder, embed = spec.models
    assert (coder.source.gguf, coder.context, coder.kv_cache.value) == (
        "/srv/models/qwen2.5-coder-7b.gguf",
        16384,
        "q8_0",
    )
    assert (embed.port, embed.args, embed.context) == (9100, ["--embedding"], 4096)
    assert "# from llama-swap model coder-7b (group coding)" in text and "(group always)" in text
    assert "# not imported: llama-swap model docker-llama: a container it starts; import it with --from-docker" in text
    assert "# not imported: llama-swap model relative: its model path path/to/m.gguf is not absolute" in text
    routes, _ = litellm_routes(
        {"model_list": [{"model_name": "mini", "litellm_params": {"model": "openai/gpt-4o-mini"}}]}
    )
    mini = {"model_name": "mini", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": "http://swap:80/v1"}}
    text, spec = _spec(docker=[facts], llama_swap=SWAP_CURRENT, litellm={"model_list": [mini]})
    assert "# LiteLLM serves it as mini" in text  # found through the llama-swap alias gpt-4o-mini
    assert routes == {"mini": {"gpt-4o-mini"}}


INJECT = "gateway: {mode: process, command: [sh, -c, 'touch /tmp/pwned'], master_key: env:K}"
BREAKS = ("\n", "\r", "\r\n", "\x85", "\u2028", "\u2029", "\n# x\n", "\x1b[2J\n")


def _injected(where: str, brk: str) -> dict[str, Any]:
    """build_spec's inputs with `brk + INJECT` in one text an imported config names."""
    evil = f"x{brk}{INJECT}"
    docker = DockerFacts("gpu1", "127.0.0.1", "unix:///var/run/docker.sock", [MARK_I])
    swap: dict[str, Any] = {"models": {"m": {"cmd": "llama-server -m /srv/m.gguf"}}}
    litellm: dict[str, Any] = {"model_list": [{"model_name": "chat", "litellm_params": {"model": "openai/m"}}]}
    ollama = [OllamaFacts("gpu1", "127.0.0.1", "http://127.0.0.1:11434", [("qwen2.5:14b", None)])]
    if where == "llama-swap model ID":
        swap = {"models": {evil: {"cmd": "llama-server -m /srv/m.gguf"}}}
    elif where == "llama-swap group":
        swap["groups"] = {evil: {"members": ["m"]}}
    elif where == "llama-swap skipped model":
        swap["models"][evil] = {"cmd": "vllm serve x"}
    elif where == "LiteLLM model_name":
        litellm["model_list"].append({"model_name": evil, "litellm_params": {"model": "openai/m"}})
    elif where == "LiteLLM fallback":
        code = f"coder{brk}{INJECT}"
        litellm["model_list"] = [
            {"model_name": code, "litellm_params": {"model": "openai/m"}},
            {"model_name": "chat", "litellm_params": {"model": "openai/qwen2.5:14b"}},
        ]
        litellm["router_settings"] = {"fallbacks": [{code: ["chat"]}]}
    elif where == "container name":
        docker = DockerFacts("gpu1", "127.0.0.1", "unix:///x", [{**MARK_I, "Name": "/" + evil}])
    elif where == "container image":
        docker = DockerFacts("gpu1", "127.0.0.1", "unix:///x", [{**MARK_I, "Config": {"Image": evil, "Labels": {}}}])
    elif where == "Ollama tag":
        ollama = [OllamaFacts("gpu1", "127.0.0.1", "http://127.0.0.1:11434", [(evil, None)])]
    return {"docker": [docker], "ollama": ollama, "litellm": litellm, "llama_swap": swap}


@pytest.mark.parametrize("brk", BREAKS, ids=[repr(b) for b in BREAKS])
@pytest.mark.parametrize(
    "where",
    ["llama-swap model ID", "llama-swap group", "llama-swap skipped model", "LiteLLM model_name", "LiteLLM fallback",
     "container name", "container image", "Ollama tag"],
)  # fmt: skip
def test_no_imported_name_injects_yaml(where: str, brk: str) -> None:
    """A line break (or a YAML line separator) in any name an imported config gives stays inside its comment or
    its quoted value: the written spec has no `gateway` key, and validates or is refused with located errors."""
    try:
        text = build_spec("lab", **_injected(where, brk))
    except ImportError_ as exc:
        assert "\n" not in str(exc)
        return
    assert "touch /tmp/pwned" in text  # the name is there, escaped
    assert not any(line.lstrip("- ").startswith("gateway") for line in text.splitlines())
    try:
        spec = parse_spec(text).spec
    except SpecError as exc:
        assert all(d.line > 0 for d in exc.diagnostics), exc.diagnostics
        return
    assert spec.gateway is None


def test_a_newline_in_a_llama_swap_model_id_stays_in_its_comment() -> None:
    """The reproduction: the ID's newline is written as an escape inside the comment."""
    text, spec = _spec(**_injected("llama-swap model ID", "\n"))
    assert spec.gateway is None
    assert f"  # from llama-swap model x\\x0a{INJECT}\n" in text


def test_import_force_never_writes_through_a_bak_symlink(wired: Wired, tmp_path: Path) -> None:
    """A symlink planted at cluster.yaml.bak is replaced by the backup, not followed (its target kept as it was)."""
    from controller.drivers.fake import FakeDockerNode

    fake = FakeDockerNode("gpu1", inspected={"mark-i": MARK_I})
    wired.set(connect=lambda spec: lambda node: fake)
    victim, out = tmp_path / "victim", tmp_path / "cluster.yaml"
    victim.write_text("precious\n")
    out.write_text("old\n")
    (tmp_path / "cluster.yaml.bak").symlink_to(victim)
    code, _, stderr = wired.run("import", "--from-docker", "gpu1=unix:///x", "-o", str(out), "--force")
    assert code == 0, stderr
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "cluster.yaml.bak").read_text() == "old\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from-docker", "gpu1=ftp://x"], "node gpu1: docker.endpoint: String should match pattern"),
        (["--from-ollama", "BAD NAME=http://127.0.0.1:1"], "node BAD NAME: name: String should match pattern"),
    ],
)
def test_cli_errors_name_the_node_and_never_end_in_a_pydantic_url(
    wired: Wired, tmp_path: Path, args: list[str], message: str
) -> None:
    code, _, stderr = wired.run("import", *args, "-o", str(tmp_path / "cluster.yaml"))
    assert code == 1 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: --from-docker/--from-ollama: ") and message in stderr, stderr
    assert "pydantic" not in stderr and "http" not in stderr.split("String should")[1], stderr
    assert not (tmp_path / "cluster.yaml").exists()


def test_no_message_on_stderr_ends_in_a_pydantic_url() -> None:
    """The one place: whatever message carries pydantic's "For further information visit" line, stderr drops it."""
    with err.capture() as captured:
        err.print("warning: x\n  Input should be a valid integer [type=int_parsing]\n"
                  "    For further information visit https://errors.pydantic.dev/2.14/v/int_parsing")  # fmt: skip
    assert captured.get() == "warning: x\n  Input should be a valid integer [type=int_parsing]\n"


def test_two_files_that_share_a_base_name_are_two_models() -> None:
    q4 = inspect("q4", ["llama-server", "-m", "/models/q4/model.gguf", "--port", "3001"], mounts=[BIND])
    q8 = inspect("q8", ["llama-server", "-m", "/models/q8/model.gguf", "--port", "3002"], mounts=[BIND])
    text, spec = _spec(docker=[DockerFacts("n", "127.0.0.1", "unix:///x", [q4, q8])])
    # A node's model volume holds one file of a name (the spec refuses two): the second is written commented out,
    # under its own name, with what to do — not merged into the first and lost.
    assert [(m.name, m.adopt, m.source.gguf) for m in spec.models] == [("q4-model", "q4", "/srv/models/q4/model.gguf")]
    assert "  # not a model yet: its file /srv/models/q8/model.gguf has the name model.gguf of q4-model's" in text
    held = text.split("then uncomment this model:\n")[1].split("routing:")[0]
    assert held.startswith("  # - name: q8-model\n  #   runtime: llamacpp\n  #   adopt: q8\n")
    uncommented = text.replace("  # - name: q8-model", "  - name: q8-model").replace("  #   ", "    ")
    renamed = uncommented.replace("/srv/models/q8/model.gguf", "/srv/models/q8/model-q8.gguf")
    assert [m.name for m in parse_spec(renamed).spec.models] == ["q4-model", "q8-model"]


def test_one_odd_container_is_skipped_with_a_warning_naming_it(wired: Wired, tmp_path: Path) -> None:
    from controller.drivers.fake import FakeDockerNode

    no_path = inspect("no-path", ["llama-server", "--port", "3005", "-m"], mounts=[BIND])
    relative = inspect("relative", ["llama-server", "-m", "models/x.gguf"], mounts=[BIND])
    bad_port = inspect("bad-port", ["llama-server", "-m", "/models/y.gguf", "--port", "3006"], mounts=[BIND],
                       network="bridge", ports={"3006/tcp": [{"HostIp": "", "HostPort": "99999"}]})  # fmt: skip
    fake = FakeDockerNode(
        "gpu1", inspected={"mark-i": MARK_I, "no-path": no_path, "relative": relative, "bad-port": bad_port}
    )
    wired.set(connect=lambda spec: lambda node: fake)
    out = tmp_path / "cluster.yaml"
    code, _, stderr = wired.run("import", "--from-docker", "gpu1=unix:///var/run/docker.sock", "-o", str(out))
    assert code == 0, stderr
    assert [m.adopt for m in parse_spec(out.read_text()).spec.models] == ["mark-i"]
    warnings = sorted(line for line in stderr.splitlines() if line.startswith("warning: not imported: container "))
    assert len(warnings) == 3, stderr
    w_port, w_path, w_relative = warnings
    assert w_port.startswith("warning: not imported: container bad-port on gpu1: port: "), w_port
    assert w_path.startswith("warning: not imported: container no-path on gpu1: its model path (none)"), w_path
    assert w_relative.startswith("warning: not imported: container relative on gpu1: its model path models/x.gguf")
    assert "cluster.yaml:" not in stderr  # no location in a file that was never written
    assert "# not imported: container relative on gpu1" in out.read_text()


def test_model_paths_that_climb_out_or_into_a_bind_mounted_root_are_refused() -> None:
    climb = inspect("climb", ["llama-server", "-m", "/models/../../etc/shadow", "--port", "3001"], mounts=[BIND])
    vol_climb = inspect("vol-climb", ["llama-server", "-m", "/data/../../../etc/shadow"], mounts=[VOLUME])
    root = {"Type": "bind", "Source": "/", "Destination": "/host", "RW": False}
    rooted = inspect("rooted", ["llama-server", "-m", "/host/etc/shadow", "--port", "3002"], mounts=[root])
    swap = {"models": {"sneaky": {"cmd": "llama-server --port ${PORT} -m /srv/models/../../etc/shadow"}}}
    text = build_spec(
        "lab", docker=[DockerFacts("n", "127.0.0.1", "unix:///x", [climb, vol_climb, rooted, MARK_I])], llama_swap=swap
    )
    spec = parse_spec(text).spec
    assert [m.adopt for m in spec.models] == ["mark-i"]  # nothing else, and so nothing else is ever copied
    assert "/etc/shadow" not in "".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "# not imported: container climb on n: its model path /models/../../etc/shadow climbs out" in text
    assert "# not imported: container vol-climb on n: its model path /data/../../../etc/shadow climbs out" in text
    assert "# not imported: container rooted on n: its model /host/etc/shadow is read through a bind mount of" in text
    assert "# not imported: llama-swap model sneaky: its model path /srv/models/../../etc/shadow climbs out" in text


def test_a_llama_swap_model_of_a_containers_file_is_that_model() -> None:
    """llama-swap names its file as its own host sees it (`/srv/models/coder-1b.gguf`); the container reads the same
    file from a Docker volume: one model, not two of one base name (one commented out as a clash)."""
    coder = inspect("mark-ii", ["llama-server", "-m", "/data/coder-1b.gguf", "--port", "3002", "-a", "coder-1b"],
                    mounts=[VOLUME])  # fmt: skip
    swap = {"models": {"coder-1b": {"cmd": "llama-server --port ${PORT} -m /srv/models/coder-1b.gguf -c 512"}}}
    text, spec = _spec(docker=[DockerFacts("n", "127.0.0.1", "unix:///x", [coder])], llama_swap=swap)
    assert [(m.name, m.adopt) for m in spec.models] == [("coder-1b", "mark-ii")]
    assert "not a model yet" not in text
    assert "also llama-swap model coder-1b" in text
