"""Label extraction: the built-in lexicon extractor, and the benchmark's LLM extractor against a fake
OpenAI-compatible server on 127.0.0.1 (answers, a 429, a 500, a hang past the timeout, a resume)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from opsd_jax.eval import metrics
from opsd_jax.eval.extract import (
    OPENSET_PROMPT,
    SENTIMENT_PROMPT,
    BuiltinExtractor,
    ExtractionError,
    LexiconExtractor,
    LLMExtractor,
    ResponseCache,
    answer_text,
    labels_from_openset,
    openset_prompt,
    polarity_sentiment,
    postprocess_response,
    sentiment_prompt,
)
from opsd_jax.eval.predictions import PredictionRecord
from opsd_jax.rationales.client import ChatClient
from tests.eval.conftest import load_openset, load_reasons, load_sentiment, merunibench_dir
from tests.eval.fake_chat_server import FakeChatServer, Reply, SleepRecorder, last_user_message


@pytest.mark.parametrize(
    "output, expected",
    [
        ("<think>maybe sad</think><answer> happy, relieved </answer>", "happy, relieved"),
        ("<answer>first</answer> then <ANSWER>second</ANSWER>", "second"),
        ("<think>long</think><answer>cut off mid-way", "cut off mid-way"),
        ("  The character's emotional state is happy.  ", "The character's emotional state is happy."),
    ],
)
def test_answer_text(output, expected):
    assert answer_text(output) == expected


@pytest.fixture(scope="module")
def lexicon(wheels):
    return LexiconExtractor(wheels.vocabulary)


def test_lexicon_matches_longest_forms_and_skips_framing_words(lexicon):
    text = "The character's emotional state is Happy, sad and ill at ease; happy again."
    assert lexicon.labels(text) == ["happy", "sad", "ill at ease"]
    assert lexicon.labels("They don't care at all") == ["don\u2019t care"]  # the lexicon's own apostrophe
    assert lexicon.labels("emotions: table, chair") == []
    assert lexicon.labels("I am here") == ["here"]  # prose picks up common words that are word forms


def test_polarity_vote(wheels):
    assert polarity_sentiment(["happy", "relieved"], wheels) == "positive"
    assert polarity_sentiment(["sad", "angry", "happy"], wheels) == "negative"
    assert polarity_sentiment([], wheels) == "neutral"
    # surprise: wheels 1, 2 "surprised" (no vote), wheel 3 "powerful" (+1), wheel 4 "fear" (-1), wheel 5 nothing.
    assert polarity_sentiment(["surprise"], wheels) == "neutral"


def test_builtin_extractor_fills_labels_and_sentiment(any_wheels):
    wheels = any_wheels
    records = [
        PredictionRecord("mer2023", "1", "<answer>worried, nervous</answer>", "worried"),
        PredictionRecord("cmumosi", "2", "<think>not sad</think><answer>happy, excited</answer>", 1.5),
    ]
    first, second = BuiltinExtractor(wheels).extract(records)
    assert first.labels == ("worried", "nervous") and first.sentiment is None and first.extractor == "builtin-lexicon"
    assert second.labels == ("happy", "excited") and second.sentiment == "positive"


def test_builtin_extractor_agrees_with_the_benchmark_extraction_on_affectgpt_answers(wheels, lexicon):
    """On AffectGPT's released answers, lexicon labels score F_s > 0.95 against the benchmark's Qwen
    extraction, and the polarity vote agrees with its sentiment on most samples."""
    for dataset in ("mer2023", "ovmerdplus", "sims"):
        reasons = load_reasons(dataset)
        names, items = load_openset(dataset)
        builtin = [lexicon.labels(answer_text(reasons[name])) for name in names]
        assert metrics.fine_grained_scores(items, builtin, wheels).f_score > 0.95
    names, sentiments = load_sentiment("sims")
    votes = [polarity_sentiment(labels, wheels) for labels in builtin]
    assert np.mean([vote == sentiment for vote, sentiment in zip(votes, sentiments)]) > 0.85


def test_prompts_are_the_benchmarks_verbatim():
    document = (merunibench_dir().parent / "reference" / "merunibench.md").read_text(encoding="utf-8")
    openset_line = next(
        line.strip(" ") for line in document.splitlines() if "Please assume the role of an expert" in line
    )
    sentiment_line = next(line.strip(" ") for line in document.splitlines() if "We provide a few words" in line)
    assert OPENSET_PROMPT == openset_line + " "
    assert SENTIMENT_PROMPT.count(" " * 13) == 6  # one space + the source's 12 of indentation, 6 times
    assert re.sub(" {13}", " ", SENTIMENT_PROMPT) == sentiment_line + " "
    assert openset_prompt("x {openset}").endswith("Input: x {openset}; Output: ")
    assert sentiment_prompt("[sad]").endswith("Input: [sad]; Output: ")


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Output: [happy, sad]", "[happy, sad]"),
        ("输出：[高兴]", "[高兴]"),
        ("\n[happy,\nsad]\n", "[happy,sad]"),
        ("Input: Output: x", "Output: x"),  # each prefix is tested once, in upstream's order
        ("positive", "positive"),
    ],
)
def test_postprocess_response(response, expected):
    assert postprocess_response(response) == expected


def test_labels_from_openset():
    assert labels_from_openset("[Happy, 'SAD ', ]") == ["happy", "sad"]


# -------------------------------------------------------------------------------------------------
# LLM extractor against a fake endpoint
# -------------------------------------------------------------------------------------------------

KNOWN_WORDS = ("happy", "sad", "angry", "calm", "worried")


def _fake_extractor_llm(request, attempt):
    """Behaves like the extractor LLM; markers in the model answer trigger failures on first attempts."""
    prompt = last_user_message(request)
    payload = prompt.rsplit("Input: ", 1)[1].removesuffix("; Output: ")
    if prompt.startswith("Please act as an expert"):  # sentiment step
        return Reply(text="positive" if "happy" in payload else "Output: negative" if payload != "[]" else "neutral")
    if "REJECT" in payload and attempt == 0:
        return Reply(status=400, error_message="prompt rejected")
    if "RATE" in payload and attempt == 0:
        return Reply(status=429, headers={"Retry-After": "0"})
    if "CRASH" in payload and attempt == 0:
        return Reply(status=500)
    if "HANG" in payload and attempt == 0:
        return Reply(text="[too late]", delay_s=4.0)
    words = [word for word in re.findall(r"[a-z]+", payload.lower()) if word in KNOWN_WORDS]
    return Reply(text="Output: [" + ", ".join(words) + "]\n", prompt_tokens=100, completion_tokens=5)


def _records():
    return [
        PredictionRecord("mer2023", "a", "<think>hmm</think><answer>He is happy RATE</answer>", "happy"),
        PredictionRecord("mer2023", "b", "He is sad CRASH", "sad"),
        PredictionRecord("cmumosi", "c", "<answer>angry HANG</answer>", -2.0),
        PredictionRecord("cmumosi", "d", "calm and happy", 1.0),
        PredictionRecord("cmumosi", "e", "calm and happy", 0.4),  # same answer: same prompts, sent once
        PredictionRecord("ovmerdplus", "f", "nothing recognisable", ("neutral",)),
    ]


def _extractor(server, cache_path):
    client = ChatClient(
        server.base_url,
        "fake-qwen",
        timeout_s=2.0,  # generous: a loaded machine must not turn a normal reply into a retry
        max_retries=2,
        max_concurrency=3,
        backoff_base_s=0.01,
        sleep=SleepRecorder(),
        seed=0,
    )
    return LLMExtractor(client, cache_path, progress=False)


def test_llm_extractor_retries_caches_and_resumes(tmp_path):
    cache_path = tmp_path / "cache.jsonl"
    with FakeChatServer(_fake_extractor_llm) as server:
        extractor = _extractor(server, cache_path)
        extracted = extractor.extract(_records())
        sent_first_run = server.count()
        resumed = _extractor(server, cache_path)
        again = resumed.extract(_records())

    assert [r.labels for r in extracted] == [("happy",), ("sad",), ("angry",), ("calm", "happy"), ("calm", "happy"), ()]
    assert [r.sentiment for r in extracted] == [None, None, "negative", "positive", "positive", None]
    assert {r.extractor for r in extracted} == {"llm:fake-qwen"}
    # 5 distinct answers + one retry each for RATE, CRASH and HANG; then 2 distinct sentiment prompts.
    assert sent_first_run == 5 + 3 + 2
    assert extractor.requests_sent == 7 and extractor.client.usage.requests == 7
    request = server.requests[0]
    assert request["messages"] == [{"role": "user", "content": request["messages"][0]["content"]}]
    assert (request["temperature"], request["top_p"], request["max_tokens"]) == (0.7, 0.8, 512)
    assert openset_prompt("He is happy RATE") in {last_user_message(r) for r in server.requests}
    assert sentiment_prompt("[calm, happy]") in {last_user_message(r) for r in server.requests}
    # The resume sent nothing and reproduced the same extraction from the cache.
    assert resumed.requests_sent == 0 and server.count() == sent_first_run and again == extracted
    cache_lines = [json.loads(line) for line in cache_path.read_text().splitlines()]
    assert len(cache_lines) == 7 and {line["model"] for line in cache_lines} == {"fake-qwen"}


def test_llm_extractor_failure_keeps_the_successes_and_a_rerun_sends_only_the_rest(tmp_path):
    cache_path = tmp_path / "cache.jsonl"
    records = [
        PredictionRecord("mer2023", "x", "happy REJECT", "happy"),
        PredictionRecord("mer2023", "y", "sad", "sad"),
    ]
    with FakeChatServer(_fake_extractor_llm) as server:
        with pytest.raises(
            ExtractionError, match="1 of 2 extractor requests failed.*prompt rejected.*1 answers are cached"
        ):
            _extractor(server, cache_path).extract(records)
        assert server.count() == 2
        rerun = _extractor(server, cache_path)
        extracted = rerun.extract(records)
    assert rerun.requests_sent == 1 and server.count() == 3
    assert [r.labels for r in extracted] == [("happy",), ("sad",)]


def test_cache_discards_an_interrupted_last_line(tmp_path):
    cache_path = tmp_path / "cache.jsonl"
    ResponseCache(cache_path).add("m", "p1", "[a]")
    with cache_path.open("a") as handle:
        handle.write('{"model": "m", "prompt": "p2", "resp')
    with pytest.warns(UserWarning, match="incomplete last line"):
        cache = ResponseCache(cache_path)
    assert len(cache) == 1 and cache.get("m", "p1") == "[a]" and cache.get("m", "p2") is None
    cache.add("m", "p2", "[b]")
    assert ResponseCache(cache_path).get("m", "p2") == "[b]"
    cache_path.write_text('{"model": "m"}\n')
    with pytest.raises(ValueError, match="cache.jsonl:1: not a cache entry"):
        ResponseCache(cache_path)
