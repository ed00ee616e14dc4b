"""The offline models side by side: quality (paraphrases, retrieval with known answers) and speed.

``compare_offline_models()`` loads every model of :data:`LOCAL_MODELS` and reports, in one run:

* paraphrases: cosine of the :data:`PARAPHRASES` pairs vs the cross pairs (unrelated);
* retrieval: ``benchmarks/data/faq_retrieval.json``, 101 support-FAQ passages, each with a
  question asked in other words; every question searches all passages (cosine, exhaustive);
  recall@1, recall@5 and MRR of the right passage;
* speed: texts per CPU-second (``time.process_time``, all threads; less inflated by a busy
  machine than wall time) on the same texts, the models measured alternately, median of rounds.

``python -m benchmarks.offline_models`` prints the figures as JSON. Touches no database.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from afterwrite.core.settings import LOCAL_MODELS, load_settings
from afterwrite.embedders.local import LocalEmbedder
from afterwrite.embedders.providers import LOCAL_MODEL_ID, WORDLLAMA_MODEL_ID, Embedder
from afterwrite.embedders.wordllama_model import WordLlamaEmbedder

RETRIEVAL_SET = Path(__file__).parent / "data" / "faq_retrieval.json"

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("How do I reset my password?", "I forgot my password, how can I change it?"),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("Stock markets fell sharply today.", "Shares dropped steeply on the exchange today."),
    ("The train to Paris was delayed.", "Our Paris-bound train ran late."),
]


def offline_embedder(model: str) -> LocalEmbedder | WordLlamaEmbedder:
    """A fresh (unloaded, uncached) embedder of the offline ``model``."""
    settings = load_settings({})
    if model == LOCAL_MODEL_ID:
        return LocalEmbedder(settings)
    if model == WORDLLAMA_MODEL_ID:
        return WordLlamaEmbedder(settings)
    raise ValueError(f"not an offline model: {model}")


def _matrix(embedder: Embedder, texts: list[str]) -> np.ndarray[Any, Any]:
    result = embedder.embed_many(texts)
    assert not result.failed, result.failed
    return np.stack([result.vectors[i] for i in range(len(texts))])


def paraphrase_scores(embedder: Embedder) -> dict[str, float]:
    """Cosines of the paraphrase pairs (related) and of every cross pair (unrelated)."""
    a = _matrix(embedder, [p[0] for p in PARAPHRASES])
    b = _matrix(embedder, [p[1] for p in PARAPHRASES])
    sims = a @ b.T
    related = np.diag(sims)
    unrelated = sims[~np.eye(len(PARAPHRASES), dtype=bool)]
    return {
        "min_related": round(float(related.min()), 3),
        "mean_related": round(float(related.mean()), 3),
        "max_unrelated": round(float(unrelated.max()), 3),
        "mean_unrelated": round(float(unrelated.mean()), 3),
    }


def retrieval_pairs() -> list[tuple[str, str]]:
    """(question, passage) pairs: the passage is the question's one right answer."""
    return [(q, p) for q, p in json.loads(RETRIEVAL_SET.read_text(encoding="utf-8"))]


def retrieval_scores(embedder: Embedder) -> dict[str, float]:
    """Recall@1, recall@5 and MRR of each question's passage among all passages."""
    pairs = retrieval_pairs()
    questions = _matrix(embedder, [q for q, _ in pairs])
    passages = _matrix(embedder, [p for _, p in pairs])
    sims = questions @ passages.T
    right = np.diag(sims)[:, None]
    ranks = (sims > right).sum(axis=1) + 1  # 1 = the right passage scored highest
    return {
        "questions": len(pairs),
        "recall_at_1": round(float((ranks <= 1).mean()), 3),
        "recall_at_5": round(float((ranks <= 5).mean()), 3),
        "mrr": round(float((1.0 / ranks).mean()), 3),
    }


def compare_offline_models(*, rounds: int = 3, repeat: int = 4) -> dict[str, Any]:
    """Quality and speed of every offline model, in this process; see the module docstring.

    Speed texts: the retrieval set's questions and passages, ``repeat`` times (distinct by a
    suffix), so both models embed exactly the same inputs.
    """
    from benchmarks.embed import realistic_texts

    pairs = retrieval_pairs()
    texts = [f"{t} ({r})" for r in range(repeat) for pair in pairs for t in pair] + realistic_texts(
        len(pairs) * 2 * repeat, seed=5
    )
    out: dict[str, Any] = {"speed_texts": len(texts), "rounds": rounds}
    embedders = {model: offline_embedder(model) for model in LOCAL_MODELS}
    for model, embedder in embedders.items():
        out[model] = {
            "dimension": embedder.dimension(),
            "load_s": round(embedder.load(), 3),
            "paraphrases": paraphrase_scores(embedder),
            "retrieval": retrieval_scores(embedder),
        }
    per_cpu_s: dict[str, list[float]] = {model: [] for model in LOCAL_MODELS}
    for _ in range(rounds):
        for model, embedder in embedders.items():
            cpu = time.process_time()
            result = embedder.embed_many(texts)
            cpu_s = time.process_time() - cpu
            assert len(result.vectors) == len(texts)
            per_cpu_s[model].append(len(texts) / cpu_s)
    for model, figures in per_cpu_s.items():
        out[model]["texts_per_cpu_s"] = round(statistics.median(figures))
    base = out[LOCAL_MODEL_ID]["texts_per_cpu_s"]
    for model in LOCAL_MODELS:
        out[model]["speed_vs_default"] = round(out[model]["texts_per_cpu_s"] / base, 1)
    return out


if __name__ == "__main__":  # python -m benchmarks.offline_models
    import os

    print(json.dumps({"load_avg": os.getloadavg(), **compare_offline_models()}, indent=2))
