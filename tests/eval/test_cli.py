"""`opsd-jax eval score` end to end on a small predictions file and emotion-wheel files written here."""

from __future__ import annotations

import json
import re

import pytest

from opsd_jax.cli import main
from opsd_jax.eval import metrics
from opsd_jax.eval.cli import EXTRACTED_PREDICTIONS_FILE
from opsd_jax.eval.datasets import DATASET_NAMES, DATASETS
from opsd_jax.eval.extract import LexiconExtractor, answer_text, polarity_sentiment
from opsd_jax.eval.predictions import read_predictions
from tests.eval.fake_chat_server import FakeChatServer, Reply, last_user_message

SAMPLES_PER_DATASET = 6
# Free-text answers in the style of the benchmark's models, over the words of conftest's small wheels.
ANSWERS = (
    "The character looks happy and excited; the voice is light, maybe relieved.",
    "Her voice breaks and the face shows grief: she is sad, perhaps unhappy.",
    "Clenched jaw and raised voice: angry, with a nervous laugh.",
    "Nothing stands out; a calm, neutral exchange.",
    "At first surprised, then clearly disgusted by what she hears.",
    "He keeps glancing around, worried and anxious.",
)


def _ground_truth(dataset, index):
    if dataset.task == "basic":
        return dataset.label_words[index % len(dataset.label_words)]
    if dataset.task == "sentiment":
        return (1.5, -0.5, 0.0, 2.0, -2.5, 0.3)[index]
    return [["happy", "relieved"], ["sad"], ["neutral"], ["angry", "worried"], [], ["nervous"]][index]


@pytest.fixture(scope="module")
def predictions_file(tmp_path_factory):
    """Six samples per dataset: free-text answers (some wrapped in <answer>) + generated GT."""
    path = tmp_path_factory.mktemp("predictions") / "predictions.jsonl"
    with path.open("w") as handle:
        for dataset in DATASETS:
            for index in range(SAMPLES_PER_DATASET):
                name, answer = f"sample_{index:02d}", ANSWERS[(index + len(dataset.name)) % len(ANSWERS)]
                output = answer if index % 2 else f"<think>weighing cues</think><answer>{answer}</answer>"
                truth = _ground_truth(dataset, index)
                line = {"dataset": dataset.name, "id": name, "output": output, "ground_truth": truth}
                handle.write(json.dumps(line) + "\n")
    return path


def _score(predictions, wheel_dir, *options):
    return main(["eval", "score", "--predictions", str(predictions), "--wheel-dir", str(wheel_dir), *map(str, options)])


def test_score_builtin_then_rescore_saved(predictions_file, tiny_wheel_dir, tiny_wheels, tmp_path, capsys):
    wheel_dir, wheels = tiny_wheel_dir, tiny_wheels
    out = tmp_path / "builtin"
    assert _score(predictions_file, wheel_dir, "--out", out) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "scores.json").read_text())
    assert data["extractor"] == "builtin-lexicon" and list(data["datasets"]) == list(DATASET_NAMES)
    assert (out / "report.md").read_text() == printed

    # The same figures straight from the library, record by record.
    lexicon = LexiconExtractor(wheels.vocabulary)
    records = read_predictions(predictions_file)
    for dataset in DATASETS:
        rows = [r for r in records if r.dataset == dataset.name]
        labels = [lexicon.labels(answer_text(r.output)) for r in rows]
        truths = [r.ground_truth for r in rows]
        if dataset.task == "basic":
            expected = metrics.hit_rate_scores(truths, labels, wheels).hit_rate
        elif dataset.task == "sentiment":
            expected = metrics.sentiment_scores(truths, [polarity_sentiment(x, wheels) for x in labels]).weighted_f1
        else:
            expected = metrics.fine_grained_scores(truths, labels, wheels).f_score
        assert data["datasets"][dataset.name]["primary"] == pytest.approx(expected, abs=1e-12), dataset.name
        assert data["datasets"][dataset.name]["num_samples"] == SAMPLES_PER_DATASET
    primaries = [data["datasets"][name]["primary"] for name in DATASET_NAMES]
    assert data["mean"] == pytest.approx(sum(primaries) / 9, abs=1e-12)
    assert f"| **This run** | {100 * primaries[0]:.2f} |" in printed and "(partial)" in printed

    # Re-scoring the written predictions needs no extractor and gives the same numbers.
    extracted = out / EXTRACTED_PREDICTIONS_FILE
    assert all(r.labels is not None and r.extractor == "builtin-lexicon" for r in read_predictions(extracted))
    rescored = tmp_path / "saved"
    assert _score(extracted, wheel_dir, "--out", rescored) == 0
    again = json.loads((rescored / "scores.json").read_text())
    assert again["extractor"] == "saved (builtin-lexicon)" and again["datasets"] == data["datasets"]
    assert not (rescored / EXTRACTED_PREDICTIONS_FILE).exists()


def _echo_llm(request, attempt):
    """Extractor stand-in: lists the known emotion words of the answer; sentiment from the list."""
    prompt = last_user_message(request)
    payload = prompt.rsplit("Input: ", 1)[1]
    if prompt.startswith("Please act as an expert"):
        return Reply(text="positive" if re.search(r"happy|excited|relaxed", payload) else "negative")
    words = re.findall(r"\b(happy|sad|angry|worried|excited|relaxed|anxious|nervous|calm)\b", payload.lower())
    return Reply(text="[" + ", ".join(dict.fromkeys(words)) + "]")


def test_score_with_the_llm_extractor_resumes_from_its_cache(predictions_file, tiny_wheel_dir, tmp_path, capsys):
    wheel_dir = tiny_wheel_dir
    out = tmp_path / "llm"
    with FakeChatServer(_echo_llm) as server:
        options = [
            "--out",
            out,
            "--extractor",
            "llm",
            "--llm-base-url",
            server.base_url,
            "--llm-model",
            "fake-qwen",
            "--llm-timeout",
            5,
            "--llm-max-retries",
            1,
            "--no-progress",
            "--llm-params",
            '{"repetition_penalty": 1.05}',
        ]
        assert _score(predictions_file, wheel_dir, *options) == 0
        first = json.loads((out / "scores.json").read_text())
        sent = server.count()
        assert _score(predictions_file, wheel_dir, *options) == 0
        second = json.loads((out / "scores.json").read_text())
    distinct_answers = len({answer_text(r.output) for r in read_predictions(predictions_file)})
    assert distinct_answers < sent <= distinct_answers + 4 * SAMPLES_PER_DATASET  # openset + sentiment prompts
    assert server.count() == sent and second["metadata"]["extractor_requests_sent"] == 0
    assert first["metadata"]["extractor_requests_sent"] == sent
    assert first["extractor"] == "llm:fake-qwen" and second["datasets"] == first["datasets"]
    assert server.requests[0]["repetition_penalty"] == 1.05 and server.requests[0]["temperature"] == 0.7
    assert first["metadata"]["extractor_usage"]["requests"] == sent
    capsys.readouterr()


def test_score_errors_exit_2_with_a_message(predictions_file, tiny_wheel_dir, tmp_path, capsys):
    wheel_dir = tiny_wheel_dir
    assert _score(predictions_file, tmp_path) == 2
    assert "emotion-wheel file" in capsys.readouterr().err
    assert _score(predictions_file, wheel_dir, "--extractor", "saved") == 2
    assert "no 'labels' saved" in capsys.readouterr().err
    assert _score(predictions_file, wheel_dir, "--extractor", "llm") == 2
    assert "--llm-base-url and --llm-model" in capsys.readouterr().err
