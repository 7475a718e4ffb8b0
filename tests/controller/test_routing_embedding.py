"""The classifier's second stage: nearest labelled examples by embedding, its budget and fallback."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from controller.core import classifier as core
from controller.core.routing import Classifier, all_examples, builtin_examples, embedding_stage
from specs.enums import Category
from specs.model import Routing, RoutingExample
from tests.support.ports import free_port

UNSURE = "what should I cook tonight with chicken and rice"  # rules: chat, unsure


def _bag(texts: Sequence[str], timeout: float) -> list[list[float]]:
    """A toy embedding: counts of a few marker words (deterministic, no server)."""
    marks = ("cook", "chicken", "rice", "prime", "segfault", "hello")
    return [[float(t.lower().count(m)) + 0.01 for m in marks] for t in texts]


def _stage(examples: list[core.Example], embed: core.Embedder = _bag, budget: float = 0.05) -> core.EmbeddingStage:
    stage = core.EmbeddingStage(examples, embed, key=f"test-{id(examples)}", budget=budget, k=3)
    assert stage.prepare() == ""
    return stage


def test_confident_rules_never_ask_the_embed_model() -> None:
    asked: list[str] = []

    def embed(texts: Sequence[str], timeout: float) -> list[list[float]]:
        asked.extend(texts)
        return _bag(texts, timeout)

    stage = _stage([core.Example("cook chicken", "fast")], embed)
    asked.clear()
    two = Classifier.from_spec(None, stage)
    got = two.classify('Traceback (most recent call last):\n  File "a.py", line 1\nValueError: x')
    assert got.category is Category.CODE and got.stage == core.RULES and got.confident
    assert asked == []
    unsure = two.classify(UNSURE)
    assert not unsure.confident and asked == [UNSURE]


def test_unsure_request_goes_to_nearest_examples() -> None:
    examples = [core.Example(f"cook chicken rice {i}", "fast", "spec") for i in range(3)]
    examples += [core.Example("prime segfault", "code")]
    got = Classifier.from_spec(None, _stage(examples)).classify(UNSURE)
    assert got.category is Category.FAST and got.stage == core.EMBEDDING
    assert [n.category for n in got.neighbours] == ["fast", "fast", "fast"]
    assert got.neighbours[0].similarity > 0.9
    doc = got.to_json()
    assert doc["stage"] == "embedding" and doc["neighbours"][0]["category"] == "fast"  # type: ignore[index]


def test_spec_examples_take_part_like_builtin_ones() -> None:
    routing = Routing(examples=[RoutingExample(text="what should I cook tonight", category=Category.REASON)])
    examples = all_examples(routing)
    assert len(examples) == len(builtin_examples()) + 1
    assert examples[-1] == core.Example("what should I cook tonight", "reason", "spec")
    stage = embedding_stage(routing, "http://127.0.0.1:9/v1", "embed", embed=_bag)
    assert stage.examples == examples and stage.budget == routing.embedding_budget


def test_spec_example_of_vision_is_refused() -> None:
    with pytest.raises(ValueError, match="decided by the request's shape"):
        RoutingExample(text="look at this", category=Category.VISION)


@contextmanager
def _server(delay: float) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers["Content-Length"])
            texts = json.loads(self.rfile.read(n))["input"]
            time.sleep(delay)
            body = json.dumps({"data": [{"index": i, "embedding": v} for i, v in enumerate(_bag(texts, 1))]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_slow_embed_model_falls_back_to_rules_within_budget() -> None:
    examples = [core.Example("cook chicken rice", "fast")]
    with _server(delay=0.0) as url:
        stage = core.EmbeddingStage(examples, core.openai_embedder(url, "e"), key=f"slow-{url}", budget=0.05)
        assert stage.prepare(5) == ""
    with _server(delay=0.5) as url:
        stage.embed = core.openai_embedder(url, "e")
        rules = Classifier.from_spec().classify(UNSURE)
        start = time.monotonic()
        got = Classifier.from_spec(None, stage).classify(UNSURE)
        took = time.monotonic() - start
    assert got.stage == core.RULES and got.category is rules.category
    # The budget ran out, or (on a loaded machine, where both end at about the same moment) the embedder's own
    # timeout, which is the budget too: either way the rules decided without waiting for the slow answer.
    assert "within 50 ms" in got.note or "timed out" in got.note, got.note
    assert took < 0.5, took  # not the server's delay: how fast the rules answer is bench/routing.py's to measure


def test_embed_model_down_falls_back_to_rules() -> None:
    port = free_port()
    stage = core.EmbeddingStage([core.Example("x", "fast")], core.openai_embedder(f"http://127.0.0.1:{port}/v1", "e"),
                                key=f"down-{port}")  # fmt: skip
    assert "embedding the examples failed" in stage.prepare(2)
    got = Classifier.from_spec(None, stage).classify(UNSURE)
    assert got.stage == core.RULES and got.note.startswith("example embeddings not ready")


def test_example_embeddings_cached_on_disk(tmp_path: Path) -> None:
    calls: list[int] = []

    def embed(texts: Sequence[str], timeout: float) -> list[list[float]]:
        calls.append(len(texts))
        return _bag(texts, timeout)

    examples = [core.Example("cook", "fast"), core.Example("prime", "reason")]
    cache = str(tmp_path / "emb.json")
    first = core.EmbeddingStage(examples, embed, key="disk-test", cache_path=cache)
    assert first.prepare() == "" and calls == [2]
    core._VECTORS.clear()
    again = core.EmbeddingStage(examples, embed, key="disk-test", cache_path=cache)
    assert again.prepare() == "" and calls == [2]  # read from the file, not embedded again
    other = core.EmbeddingStage([*examples, core.Example("hello", "fast")], embed, key="disk-test", cache_path=cache)
    assert other.prepare() == "" and calls == [2, 3]  # another example set: another hash


def _unsure(category: str, scores: dict[str, float]) -> core.Classification:
    return core.Classification(category, ("test",), scores, confident=False)


def _near(*pairs: tuple[str, float]) -> list[core.Neighbour]:
    return [core.Neighbour(category, similarity, f"example {i}") for i, (category, similarity) in enumerate(pairs)]


def test_fuse_clear_neighbours_outvote_unsure_rules() -> None:
    neighbours = _near(*[("fast", 0.9)] * 8, ("chat", 0.9), ("chat", 0.9))
    got = core.fuse(neighbours, _unsure("chat", {"chat": 0.5}))
    assert got is not None
    category, scores = got
    # fast: 8 of 10 equal votes = 0.8; chat: 0.2 + 0.75 × (0.5 + 1.0) / (1 + 1.5) = 0.65
    assert category == "fast"
    assert scores["fast"] == pytest.approx(0.8) and scores["chat"] == pytest.approx(0.65)


def test_fuse_unsure_rules_tip_a_split_vote() -> None:
    neighbours = _near(("code", 0.8), ("code", 0.8), ("chat", 0.8), ("chat", 0.8), ("reason", 0.8))
    assert core.fuse(neighbours, _unsure("chat", {"code": 0.5}))[0] == "chat"  # type: ignore[index]
    assert core.fuse(neighbours, _unsure("code", {"code": 1.2}))[0] == "code"  # type: ignore[index]


def test_fuse_nearer_examples_count_more() -> None:
    # similarity squared: one example at 0.9 (0.81) outweighs two at 0.6 (0.36 each)
    neighbours = _near(("reason", 0.9), ("chat", 0.6), ("chat", 0.6))
    got = core.fuse(neighbours, _unsure("fast", {}), prior=0.0)
    assert got is not None and got[0] == "reason"


def test_fuse_without_similar_examples_leaves_it_to_the_rules() -> None:
    assert core.fuse(_near(("code", -0.2), ("chat", 0.0)), _unsure("chat", {})) is None

    def opposite(texts: Sequence[str], timeout: float) -> list[list[float]]:
        return [[1.0, 0.0] if t == "prime" else [-1.0, 0.0] for t in texts]  # the request points away from it

    stage = _stage([core.Example("prime", "code")], embed=opposite)
    got = Classifier.from_spec(None, stage).classify(UNSURE)
    assert got.stage == core.RULES and got.category is Category.CHAT and "no example is similar" in got.note


def test_embed_model_pauses_after_failures_in_a_row() -> None:
    calls: list[str] = []
    down = [False]

    def embed(texts: Sequence[str], timeout: float) -> list[list[float]]:
        calls.extend(texts)
        if down[0]:
            raise core.EmbedError("connection refused")
        return _bag(texts, timeout)

    now = [100.0]
    stage = core.EmbeddingStage([core.Example("cook chicken rice", "fast")], embed, key="pause-test", k=1,
                                clock=lambda: now[0])  # fmt: skip
    assert stage.prepare() == ""
    two = Classifier.from_spec(None, stage)
    down[0] = True
    notes = [two.classify(UNSURE).note for _ in range(core.PAUSE_AFTER + 1)]
    assert all(n.startswith("embed model failed (connection refused)") for n in notes[: core.PAUSE_AFTER])
    assert notes[-1].endswith("recently: rules decide")  # paused: the model was not asked again
    asked = len(calls)
    down[0] = False
    now[0] += core.RETRY_AFTER + 1
    got = two.classify(UNSURE)
    assert got.stage == core.EMBEDDING and len(calls) == asked + 1
    down[0] = True  # a success in between resets the count: one failure alone does not pause
    assert two.classify(UNSURE).note.startswith("embed model failed")
    down[0] = False
    assert two.classify(UNSURE).stage == core.EMBEDDING
