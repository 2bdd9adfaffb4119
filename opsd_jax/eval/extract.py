"""Free text -> emotion labels (and, for the sentiment datasets, a sentiment answer).

Two extractors fill in `labels` / `sentiment` of `PredictionRecord`s:

* `LexiconExtractor` (name "builtin-lexicon"): no model. It takes the answer part of the output
  (`<answer>...</answer>` when present, else the whole text) and matches it, longest phrase first,
  against the benchmark's word-form lexicon (format.csv). The sentiment datasets get a
  positive / negative / neutral answer from a polarity vote of the labels' level1 words over the
  five wheels. This is this package's own rule, not the benchmark's, and reports say so. It suits
  answers that list emotions; in prose it also catches common words that happen to be word forms
  ("here", "present", "care").
* `LLMExtractor` (name "llm:<model>"): the benchmark's own extractor. Its two prompts (AffectGPT
  `toolkit/utils/qwen.py`: `reason_to_openset_qwen`, `openset_to_sentiment_qwen`), user-only
  messages, its response post-processing and `string_to_list` parsing, sent to any OpenAI-compatible
  endpoint (the benchmark runs Qwen2.5-7B-Instruct under vLLM with temperature 0.7, top_p 0.8,
  repetition_penalty 1.05, max_tokens 512). Like the built-in extractor it reads the answer part of
  the output, which is the whole output (as in the benchmark) when there are no <answer> tags. Every
  answer is appended to a JSONL cache keyed by (model, prompt), so a rerun or a resumed run sends
  nothing twice.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from opsd_jax.data.jsonl import read_complete
from opsd_jax.eval.datasets import get_dataset
from opsd_jax.eval.predictions import PredictionRecord
from opsd_jax.eval.wheels import EmotionWheels, split_label_string
from opsd_jax.rationales.client import ChatClient, ChatClientError, ChatRequest

BUILTIN_EXTRACTOR = "builtin-lexicon"

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)


def answer_text(output: str) -> str:
    """The last `<answer>...</answer>` block; the text after an unclosed `<answer>`; else all of it."""
    blocks = _ANSWER_BLOCK.findall(output)
    if blocks:
        return blocks[-1].strip()
    opening = list(_ANSWER_OPEN.finditer(output))
    if opening:
        return output[opening[-1].end() :].strip()
    return output.strip()


# --------------------------------------------------------------------------------------------------
# Built-in lexicon extractor
# --------------------------------------------------------------------------------------------------

# Word forms that free text uses to talk about emotion in general ("the character's emotional state
# is ..."), not to name one; matching them would add a label to nearly every answer.
FRAMING_WORDS = frozenset({"emotion", "emotions", "emotional", "emotionally", "sentiment", "sentiments"})

# Polarity of every level1 word of the five wheels; "surprised" (wheels 1, 2) casts no vote.
LEVEL1_POLARITY: dict[str, int] = {
    **dict.fromkeys(("happy", "joyful", "powerful", "peaceful", "joy", "genius"), 1),
    **dict.fromkeys(("mad", "angry", "anger", "sad", "scared", "fearful", "fear", "disgusted", "disgust", "bad"), -1),
    "surprised": 0,
}

_TOKEN = re.compile(r"[a-z]+(?:['-][a-z]+)*")


def _fold_apostrophes(text: str) -> str:
    return text.replace("\u2019", "'")


class LexiconExtractor:
    """Longest-match lookup of word forms in text. `forms`: the lexicon (EmotionWheels.vocabulary)."""

    name = BUILTIN_EXTRACTOR

    def __init__(self, forms: Iterable[str], framing_words: Iterable[str] = FRAMING_WORDS):
        # Key on folded apostrophes (text says "don't", format.csv "don’t"); return the lexicon's spelling.
        framing = {_fold_apostrophes(word) for word in framing_words}
        self._forms = {_fold_apostrophes(form): form for form in forms if _fold_apostrophes(form) not in framing}
        if not self._forms:
            raise ValueError("forms: the lexicon is empty")
        self._max_words = max(len(form.split()) for form in self._forms)

    def labels(self, text: str) -> list[str]:
        """Word forms found in `text`, first occurrence order, no repeats."""
        tokens = _TOKEN.findall(_fold_apostrophes(text.lower()))
        found: dict[str, None] = {}
        position = 0
        while position < len(tokens):
            for width in range(min(self._max_words, len(tokens) - position), 0, -1):
                form = self._forms.get(" ".join(tokens[position : position + width]))
                if form is not None:
                    found[form] = None
                    position += width
                    break
            else:
                position += 1
        return list(found)


def polarity_sentiment(labels: Sequence[str], wheels: EmotionWheels) -> str:
    """positive / negative / neutral by a vote: each label casts, in each wheel, the polarity of its
    level1 word; the sign of the sum decides, 0 (or no mappable label) is neutral."""
    vote = sum(LEVEL1_POLARITY.get(word, 0) for label in labels for word in wheels.map_word_all(label) if word)
    return "positive" if vote > 0 else "negative" if vote < 0 else "neutral"


class BuiltinExtractor:
    """Fills labels (and sentiment) of records with the lexicon extractor and the polarity vote."""

    name = BUILTIN_EXTRACTOR

    def __init__(self, wheels: EmotionWheels):
        self.wheels = wheels
        self.lexicon = LexiconExtractor(wheels.vocabulary)

    def extract(self, records: Sequence[PredictionRecord]) -> list[PredictionRecord]:
        completed = []
        for record in records:
            labels = tuple(self.lexicon.labels(answer_text(record.output)))
            is_sentiment = get_dataset(record.dataset).task == "sentiment"
            sentiment = polarity_sentiment(labels, self.wheels) if is_sentiment else None
            completed.append(dataclasses.replace(record, labels=labels, sentiment=sentiment, extractor=self.name))
        return completed


# --------------------------------------------------------------------------------------------------
# The benchmark's LLM extractor
# --------------------------------------------------------------------------------------------------

# Verbatim from AffectGPT toolkit/utils/qwen.py (Apache-2.0), whitespace included: the sentiment
# prompt's source indentation leaves 12 extra spaces after each sentence break.
OPENSET_PROMPT = (
    "Please assume the role of an expert in the field of emotions. "
    "We provide clues that may be related to the emotions of the characters. Based on the provided clues, "
    "please identify the emotional states of the main character. "
    "The main character is the one with the most detailed clues. "
    "Please separate different emotional categories with commas and output only the clearly identifiable "
    "emotional categories in a list format. "
    "If none are identified, please output an empty list. "
    "Input: We cannot recognize his emotional state; Output: [] "
    "Input: His emotional state is happy, sad, and angry; Output: [happy, sad, angry] "
    "Input: {reason}; Output: "
)
_INDENT = " " * 12
SENTIMENT_PROMPT = (
    f"Please act as an expert in the field of emotions. {_INDENT}"
    f"We provide a few words to describe the emotions of a character. {_INDENT}"
    f"Please choose the most likely sentiment from the given candidates: [positive, negative, neutral] {_INDENT}"
    f"Please direct output answer without analyzing process. {_INDENT}"
    f"Input: [joyful]; Output: positive {_INDENT}"
    f"Input: []; Output: neutral {_INDENT}"
    "Input: {openset}; Output: "
)

# The benchmark's vLLM sampling (repetition_penalty is a vLLM extension; add it with extra params).
BENCHMARK_SAMPLING: dict[str, float | int] = {"temperature": 0.7, "top_p": 0.8, "max_tokens": 512}


def openset_prompt(reason: str) -> str:
    return OPENSET_PROMPT.replace("{reason}", reason)


def sentiment_prompt(openset: str) -> str:
    return SENTIMENT_PROMPT.replace("{openset}", openset)


_LEADING_WORDS = ("输入", "输出", "翻译", "让我们来翻译一下：", "output", "Output", "input", "Input")


def postprocess_response(response: str) -> str:
    """The benchmark's `func_postprocess_qwen`: drop a leading Input/Output-like word, a leading colon
    and every newline."""
    response = response.strip()
    for word in _LEADING_WORDS:  # sequential, as upstream: each prefix is tested once, in this order
        if response.startswith(word):
            response = response[len(word) :]
    response = response.strip()
    for colon in (":", "："):
        if response.startswith(colon):
            response = response[len(colon) :]
    return response.strip().replace("\n", "").strip()


def labels_from_openset(openset: str) -> list[str]:
    """The benchmark's parse of an extractor answer: string_to_list, then lowercase and strip."""
    return [label.lower().strip() for label in split_label_string(openset)]


class ResponseCache:
    """Append-only JSONL of {"model", "prompt", "response", "prompt_tokens", "completion_tokens"}.

    Lookups by (model, prompt). A last line cut short by a crash is discarded on open.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._responses: dict[tuple[str, str], str] = {}
        if not self.path.exists():
            return
        for line_number, line in enumerate(read_complete(self.path).decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._responses[(entry["model"], entry["prompt"])] = entry["response"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{self.path}:{line_number}: not a cache entry ({err!r})") from None

    def __len__(self) -> int:
        return len(self._responses)

    def get(self, model: str, prompt: str) -> str | None:
        return self._responses.get((model, prompt))

    def add(self, model: str, prompt: str, response: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self._responses[(model, prompt)] = response
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "model": model,
            "prompt": prompt,
            "response": response,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


class ExtractionError(RuntimeError):
    """Some extractor requests failed for good; the successful ones are cached."""


class LLMExtractor:
    """The benchmark's two-step LLM extraction through an OpenAI-compatible endpoint, cached on disk."""

    def __init__(
        self,
        client: ChatClient,
        cache_path: str | Path,
        sampling: Mapping[str, object] | None = None,
        progress: bool = True,
    ):
        self.client = client
        self.cache = ResponseCache(cache_path)
        self.sampling = dict(BENCHMARK_SAMPLING if sampling is None else sampling)
        self.progress = progress
        self.requests_sent = 0

    @property
    def name(self) -> str:
        return f"llm:{self.client.model}"

    def complete_prompts(self, prompts: Sequence[str], description: str) -> list[str]:
        """Post-processed answers for `prompts`: cached ones are reused, each missing distinct prompt
        is sent once and cached as soon as it returns."""
        model = self.client.model
        missing = list(dict.fromkeys(prompt for prompt in prompts if self.cache.get(model, prompt) is None))
        failures: list[str] = []
        if missing:
            requests = [ChatRequest([{"role": "user", "content": prompt}], self.sampling) for prompt in missing]
            for index, result in self.client.map(requests, progress=self.progress, description=description):
                self.requests_sent += 1
                if isinstance(result, ChatClientError):
                    failures.append(str(result))
                    continue
                self.cache.add(model, missing[index], result.text, result.prompt_tokens, result.completion_tokens)
        if failures:
            raise ExtractionError(
                f"{len(failures)} of {len(missing)} extractor requests failed (first: {failures[0]}); "
                f"{len(missing) - len(failures)} answers are cached in {self.cache.path}, a rerun resumes from there"
            )
        return [postprocess_response(self.cache.get(model, prompt) or "") for prompt in prompts]

    def extract(self, records: Sequence[PredictionRecord]) -> list[PredictionRecord]:
        answers = [answer_text(record.output) for record in records]
        opensets = self.complete_prompts([openset_prompt(answer) for answer in answers], "openset labels")
        sentiment_rows = [i for i, record in enumerate(records) if get_dataset(record.dataset).task == "sentiment"]
        sentiments = self.complete_prompts([sentiment_prompt(opensets[i]) for i in sentiment_rows], "sentiment")
        sentiment_of = dict(zip(sentiment_rows, sentiments))
        return [
            dataclasses.replace(
                record,
                labels=tuple(labels_from_openset(openset)),
                sentiment=sentiment_of.get(i),
                extractor=self.name,
            )
            for i, (record, openset) in enumerate(zip(records, opensets))
        ]


def check_saved_extractions(records: Sequence[PredictionRecord]) -> str:
    """Validate that every record already carries its extraction; returns the extractor name(s)."""
    for record in records:
        if record.labels is None:
            raise ValueError(f"{record.dataset}/{record.id}: no 'labels' saved; choose --extractor builtin or llm")
        if get_dataset(record.dataset).task == "sentiment" and record.sentiment is None:
            raise ValueError(f"{record.dataset}/{record.id}: no 'sentiment' saved for a sentiment dataset")
    names = sorted({record.extractor or "unspecified" for record in records})
    return "saved (" + ", ".join(names) + ")"
