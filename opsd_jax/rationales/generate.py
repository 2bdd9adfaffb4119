"""Writes one evidence-aware rationale per clip to a JSONL file, resumably; merges them into a manifest.

The output file holds one JSON object per clip, appended (and fsync'ed) the moment the clip is finished,
so a crash loses at most the requests in flight:

    {"id": "clip_0001", "status": "ok", "rationale": "Her brows are drawn together ...", "model": "gpt-4o",
     "usage": {"prompt_tokens": 1204, "completion_tokens": 96, "cost": 0.0041}, "attempts": 1, "frames": 8,
     "audio": false, "prompt_sha": "3f2a...", "created": "2026-07-01T12:00:00Z"}
    {"id": "clip_0002", "status": "failed", "error": "clip 'clip_0002': cannot read /data/v/2.mp4: ...",
     "video": "/data/v/2.mp4", "model": "gpt-4o", "usage": {...}, "attempts": 0, "created": "..."}

`served_model` is added when the response names another model (a dated version); a clip failed by
validation keeps its `last_answer`. `usage` sums every attempt of the clip; `prompt_sha` names the prompt
wording (`opsd_jax.rationales.prompt.PROMPT_SHA`).

* Resuming: ids already in the file are skipped (ok and failed alike), so rerunning the same command
  continues where a run stopped; `retry_failed=True` first drops the failed lines (atomically) and tries
  those clips again. A last line cut short by a crash is dropped. No id is ever written twice, and the
  file is locked (flock) so that two runs cannot append to it at once.
* Failed for good (a `failed` line): unreadable media, an answer that fails validation on every attempt
  (1 + `validation_retries`), or a 4xx rejection of the clip's request. Endpoint trouble that outlasts the
  client's retries (429, 5xx, timeouts, no connection) writes nothing: the clip stays missing, counted as
  `unfinished`, and a rerun sends it again. 401/403/404 (key, permissions, model name) stop the run.
* Validation (`validate_rationale`): not empty, not cut off at max_tokens, within word and character
  bounds, not merely the label's words, no mention of a label or annotation.

Clips are sent in chunks through `ChatClient.map` (bounded concurrency) while a background thread decodes
the next chunk's frames, so memory holds a few chunks of JPEGs, never the whole manifest's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from opsd_jax.data.jsonl import complete_length
from opsd_jax.data.manifest import Clip, read_manifest, write_manifest
from opsd_jax.data.media import read_audio, read_video
from opsd_jax.data.vision_inputs import IMAGE_FACTOR
from opsd_jax.rationales.client import ChatClient, ChatClientError, ChatRequest, ChatResponse
from opsd_jax.rationales.prompt import PROMPT_SHA, PromptOptions, build_messages, describe_label

STATUS_OK = "ok"
STATUS_FAILED = "failed"
FATAL_STATUSES = (401, 403, 404)  # the key, the permissions or the model name: every request would fail
DEFAULT_REQUEST_PARAMS = {"temperature": 0.2, "max_tokens": 512}

_MENTIONS_LABEL = re.compile(r"\b(labels?|label+ed|annotat\w*|ground[\s-]*truth)\b", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
_FILLER_WORDS = frozenset(
    "a an the is are was be this that it its of and or with clip person speaker emotion emotions sentiment "
    "feeling feels shows expresses".split()
)


class RationaleFileError(ValueError):
    """A rationale file that cannot be read or written as such; the message names the file (and line)."""


class InvalidRationale(ValueError):
    """An answer that is not a usable rationale; the message says why."""


# ----- validation ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ValidationRules:
    """Bounds an answer must meet. `for_prompt` derives them from the prompt's own word bound."""

    min_words: int = 15
    max_words: int = 150
    min_chars: int = 60
    max_chars: int = 1500

    def __post_init__(self):
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(
                f"min_words/max_words: expected 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}"
            )
        if not 1 <= self.min_chars <= self.max_chars:
            raise ValueError(
                f"min_chars/max_chars: expected 1 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}"
            )

    @classmethod
    def for_prompt(cls, max_words: int, min_words: int = 15) -> ValidationRules:
        """Models miscount words: accept 25% over the bound asked for, and ~10 characters a word."""
        allowed = math.ceil(1.25 * max_words)
        return cls(min_words=min_words, max_words=allowed, min_chars=4 * min_words, max_chars=10 * allowed)


def validate_rationale(text: str, clip: Clip, rules: ValidationRules, finish_reason: str | None = None) -> str:
    """The answer as one clean paragraph (a leading <think> block dropped, whitespace collapsed), or
    `InvalidRationale` saying what is wrong with it."""
    if finish_reason == "length":
        raise InvalidRationale("cut off by the token limit (finish_reason 'length'); raise max_tokens")
    text = " ".join(_THINK_BLOCK.sub("", text or "").split())
    if not text:
        raise InvalidRationale("empty answer")
    mention = _MENTIONS_LABEL.search(text)
    if mention:
        raise InvalidRationale(f"mentions {mention.group(0)!r}: the rationale must not refer to a given label")
    words = text.split()
    label_words = {token for word in describe_label(clip).words for token in re.findall(r"[a-z']+", word.lower())}
    tokens = set(re.findall(r"[a-z']+", text.lower()))
    if tokens <= label_words | _FILLER_WORDS:
        raise InvalidRationale(f"only repeats the label ({text[:80]!r})")
    if not rules.min_words <= len(words) <= rules.max_words:
        raise InvalidRationale(f"{len(words)} words; expected {rules.min_words} to {rules.max_words}")
    if not rules.min_chars <= len(text) <= rules.max_chars:
        raise InvalidRationale(f"{len(text)} characters; expected {rules.min_chars} to {rules.max_chars}")
    return text


# ----- the rationale file ----------------------------------------------------------------------------------


def _parse_lines(data: bytes, path: Path) -> dict[str, dict[str, Any]]:
    """id -> record for complete JSONL lines; a malformed line or a repeated id is an error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RationaleFileError(f"{path}: not UTF-8 text ({err})") from None
    records: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RationaleFileError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not record["id"]:
            raise RationaleFileError(f"{where}: field 'id': expected a JSON object with a non-empty string id")
        if record.get("status") not in (STATUS_OK, STATUS_FAILED):
            raise RationaleFileError(
                f"{where}: field 'status': expected 'ok' or 'failed', got {record.get('status')!r}"
            )
        if record["status"] == STATUS_OK and not (isinstance(record.get("rationale"), str) and record["rationale"]):
            raise RationaleFileError(f"{where}: field 'rationale': expected a non-empty string for status 'ok'")
        if record["id"] in records:
            raise RationaleFileError(f"{where}: field 'id': {record['id']!r} appears twice")
        records[record["id"]] = record
    return records


def read_rationales(path: str | Path) -> dict[str, dict[str, Any]]:
    """id -> record of a rationale file, in file order; a cut-short last line is ignored (with a warning)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rationale file {path} does not exist")
    data = path.read_bytes()  # read-only: a running generation may still complete that line
    return _parse_lines(data[: complete_length(data, path)], path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RationaleFile:
    """The output JSONL, held by one run: locked, its cut-short last line dropped, its records loaded.

    `append` writes one record, flushes and fsyncs before returning; an id already in the file is refused.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        self._handle = None

    def __enter__(self) -> RationaleFile:
        self._open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        handle = open(self.path, "a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RationaleFileError(f"{self.path}: another run is writing this file (it is locked)") from None
        try:
            if created:
                _fsync_directory(self.path.parent)
            handle.seek(0)
            data = handle.read()
            complete = complete_length(data, self.path)
            if complete < len(data):
                handle.truncate(complete)
                os.fsync(handle.fileno())
            self.records = _parse_lines(data[:complete], self.path)
        except BaseException:
            handle.close()
            raise
        self._handle = handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # releases the lock
            self._handle = None

    def append(self, record: Mapping[str, Any]) -> None:
        if record["id"] in self.records:
            raise RationaleFileError(f"{self.path}: id {record['id']!r} is already in the file")
        self._handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.records[record["id"]] = dict(record)

    def drop_failed(self) -> int:
        """Rewrites the file without its failed lines (a temporary file, then an atomic rename); returns how
        many were dropped."""
        kept = [record for record in self.records.values() if record["status"] == STATUS_OK]
        dropped = len(self.records) - len(kept)
        if dropped:
            temporary = self.path.with_name(self.path.name + ".tmp")
            with open(temporary, "wb") as handle:
                handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
            _fsync_directory(self.path.parent)
            self.close()
            self._open()
        return dropped


# ----- one run ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSummary:
    selected: int  # clips of the manifest (split) this run covers
    skipped: int  # already in the output file
    done: int  # rationales written by this run
    failed: int  # failed lines written by this run
    unfinished: int  # endpoint errors after the client's retries: nothing written, a rerun retries them
    remaining: int  # selected clips still without a line (unfinished + those left out by `limit`)
    retried_failed: int  # failed lines dropped by `retry_failed`
    requests: int  # chat requests sent (validation retries included)
    prompt_tokens: int
    completion_tokens: int
    cost: float
    first_error: str | None = None

    def __str__(self) -> str:
        lines = [
            f"rationales: {self.done} written, {self.skipped} already there, {self.failed} failed, "
            f"{self.unfinished} unfinished, {self.remaining} of {self.selected} still missing",
            f"requests: {self.requests}; tokens: {self.prompt_tokens} prompt + {self.completion_tokens} completion; "
            f"cost: {self.cost:.4f}",
        ]
        if self.retried_failed:
            lines.append(f"retried {self.retried_failed} previously failed clips")
        if self.first_error:
            lines.append(f"first error: {self.first_error}")
        return "\n".join(lines)


@dataclasses.dataclass
class _Job:
    """One clip on its way to a rationale: its request and what its attempts have cost."""

    clip: Clip
    messages: list[dict[str, Any]]
    frames: int
    audio: bool
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def load_frames(clip: Clip, frames_per_clip: int, max_side: int) -> np.ndarray:
    """`[T <= frames_per_clip, H, W, 3]` uint8 frames spread evenly over the clip's video; frames repeated
    because the video is shorter than `frames_per_clip` are sent once. Raises `MediaError`."""
    # Decode near the size the prompt sends (it shrinks further to `max_side`), never upscaling to the
    # encoder's minimum size.
    video = read_video(
        clip.video,
        record_id=clip.id,
        num_frames=frames_per_clip,
        min_pixels=IMAGE_FACTOR**2,
        max_pixels=max(max_side, IMAGE_FACTOR) ** 2,
    )
    frames = video.frames
    keep = [0] + [i for i in range(1, len(frames)) if not np.array_equal(frames[i], frames[i - 1])]
    return frames[keep]


def _prepare(
    clips: Sequence[Clip], frames_per_clip: int, options: PromptOptions, include_audio: bool
) -> list[_Job | dict[str, Any]]:
    """Each clip's request, or its failed record when its media cannot be read."""
    prepared: list[_Job | dict[str, Any]] = []
    for clip in clips:
        try:
            frames = load_frames(clip, frames_per_clip, options.max_side)
            audio = read_audio(clip.audio or clip.video, record_id=clip.id) if include_audio else None
            messages = build_messages(clip, frames, options, audio=audio)
        except (ValueError, OSError) as err:  # MediaError is a ValueError
            record = {"id": clip.id, "status": STATUS_FAILED, "error": str(err), "video": str(clip.video)}
            if clip.audio is not None:
                record["audio_file"] = str(clip.audio)
            prepared.append(record)
            continue
        prepared.append(_Job(clip, messages, frames=len(frames), audio=audio is not None))
    return prepared


def _select(clips: Sequence[Clip], split: str | None, source: str) -> list[Clip]:
    if split is None:
        return list(clips)
    selected = [clip for clip in clips if clip.split == split]
    if not selected and clips:
        present = ", ".join(sorted({clip.split for clip in clips}))
        raise ValueError(f"split {split!r}: no clip of {source} has it; splits present: {present}")
    return selected


def generate_rationales(
    manifest: str | Path | Sequence[Clip],
    out_jsonl: str | Path,
    client: ChatClient,
    *,
    frames_per_clip: int = 8,
    split: str | None = None,
    limit: int | None = None,
    prompt_options: PromptOptions = PromptOptions(),
    rules: ValidationRules | None = None,
    validation_retries: int = 2,
    request_params: Mapping[str, Any] | None = None,
    include_audio: bool = False,
    retry_failed: bool = False,
    chunk_size: int | None = None,
    progress: bool = True,
) -> RunSummary:
    """Writes a rationale line (or a failed line) to `out_jsonl` for every clip of `manifest` (only those
    of `split` when given) that the file lacks; returns what the run did.

    Args:
      manifest: a manifest path or its clips (`read_manifest`).
      client: the endpoint; its `max_concurrency` bounds the requests in flight.
      frames_per_clip: frames sampled evenly over each video and sent as JPEGs.
      limit: at most this many clips still lacking a line are attempted (a trial run, a budget).
      rules: answer bounds; default `ValidationRules.for_prompt(prompt_options.max_words)`.
      validation_retries: an invalid answer is asked for again this many times, then recorded as failed.
      request_params: sampling parameters of every request (default `DEFAULT_REQUEST_PARAMS`).
      include_audio: send each clip's audio (its `audio` file, else the video's track) as `input_audio`.
      retry_failed: drop the file's failed lines first and try those clips again.
      chunk_size: clips decoded and sent per `ChatClient.map` call (default 4 x the client's concurrency).
    """
    if frames_per_clip < 1:
        raise ValueError(f"frames_per_clip: expected at least 1, got {frames_per_clip}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit: expected >= 0, got {limit}")
    if validation_retries < 0:
        raise ValueError(f"validation_retries: expected >= 0, got {validation_retries}")
    chunk_size = chunk_size or 4 * client.max_concurrency
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected at least 1, got {chunk_size}")
    rules = rules or ValidationRules.for_prompt(prompt_options.max_words)
    params = dict(DEFAULT_REQUEST_PARAMS if request_params is None else request_params)
    source = str(manifest) if isinstance(manifest, (str, Path)) else "the manifest"
    clips = read_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
    selected = _select(clips, split, source)
    usage_before = client.usage
    with RationaleFile(out_jsonl) as output:
        retried_failed = output.drop_failed() if retry_failed else 0
        todo = [clip for clip in selected if clip.id not in output.records]
        skipped = len(selected) - len(todo)
        todo = todo if limit is None else todo[:limit]
        chunks = iter([todo[start : start + chunk_size] for start in range(0, len(todo), chunk_size)])
        bar = tqdm(total=len(todo), desc="rationales", unit="clip", disable=not progress)
        run = _Run(client, output, rules, validation_retries, params, bar)
        with bar, concurrent.futures.ThreadPoolExecutor(max_workers=1) as decoder:

            def decode_next_chunk() -> concurrent.futures.Future | None:
                chunk = next(chunks, None)
                return (
                    None
                    if chunk is None
                    else decoder.submit(_prepare, chunk, frames_per_clip, prompt_options, include_audio)
                )

            upcoming = decode_next_chunk()
            retries: list[_Job] = []
            while upcoming is not None or retries:
                jobs = retries
                if upcoming is not None:
                    prepared = upcoming.result()
                    upcoming = decode_next_chunk()  # decoded while this chunk's requests run
                    for item in prepared:
                        if isinstance(item, _Job):
                            jobs.append(item)
                        else:
                            run.write_failed(item)
                retries = run.send(jobs)
        remaining = sum(clip.id not in output.records for clip in selected)
    usage_after = client.usage
    return RunSummary(
        selected=len(selected),
        skipped=skipped,
        done=run.done,
        failed=run.failed,
        unfinished=run.unfinished,
        remaining=remaining,
        retried_failed=retried_failed,
        requests=run.requests,
        prompt_tokens=usage_after.prompt_tokens - usage_before.prompt_tokens,
        completion_tokens=usage_after.completion_tokens - usage_before.completion_tokens,
        cost=usage_after.cost - usage_before.cost,
        first_error=run.first_error,
    )


class _Run:
    """Sends jobs, judges the answers and writes each finished clip's line; counts what happened."""

    def __init__(
        self,
        client: ChatClient,
        output: RationaleFile,
        rules: ValidationRules,
        validation_retries: int,
        params: Mapping[str, Any],
        bar: tqdm,
    ):
        self.client, self.output, self.rules, self.bar = client, output, rules, bar
        self.validation_retries = validation_retries
        self.params = params
        self.done = self.failed = self.unfinished = self.requests = 0
        self.first_error: str | None = None

    def send(self, jobs: list[_Job]) -> list[_Job]:
        """Runs `jobs` through `ChatClient.map`; returns those whose answers must be asked for again."""
        if not jobs:
            return []
        retries = []
        requests = [ChatRequest(job.messages, self.params) for job in jobs]
        with contextlib.closing(self.client.map(requests, progress=False)) as results:
            for index, result in results:
                job = jobs[index]
                job.attempts += 1
                self.requests += 1
                kind, value = _settle(job, result, self.rules, self.validation_retries)
                if kind == "retry":
                    retries.append(job)
                elif kind == "unfinished":
                    self.unfinished += 1
                    self.first_error = self.first_error or f"clip {job.clip.id!r}: {value}"
                    self.bar.update(1)
                elif kind == "failed":
                    record = {
                        "id": job.clip.id,
                        "status": STATUS_FAILED,
                        "error": f"clip {job.clip.id!r}: {value}",
                        "video": str(job.clip.video),
                        "usage": self._usage(job),
                        "attempts": job.attempts,
                    }
                    if isinstance(value, InvalidRationale):
                        record["last_answer"] = result.text[:2000]
                    self.write_failed(record)
                else:
                    self._write_ok(job, value, result)
        return retries

    def _usage(self, job: _Job) -> dict[str, Any]:
        cost = (
            job.prompt_tokens * self.client.cost_per_1k_prompt_tokens
            + job.completion_tokens * self.client.cost_per_1k_completion_tokens
        ) / 1000
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens, "cost": cost}

    def _write_ok(self, job: _Job, rationale: str, result: ChatResponse) -> None:
        record = {
            "id": job.clip.id,
            "status": STATUS_OK,
            "rationale": rationale,
            "model": self.client.model,
            "usage": self._usage(job),
            "attempts": job.attempts,
            "frames": job.frames,
            "audio": job.audio,
            "prompt_sha": PROMPT_SHA,
            "created": _utc_now(),
        }
        if result.raw.get("model") not in (None, self.client.model):
            record["served_model"] = result.raw["model"]
        self.output.append(record)
        self.done += 1
        self.bar.update(1)

    def write_failed(self, record: dict[str, Any]) -> None:
        """Writes a failed line (media failures arrive with only id, error and paths)."""
        defaults = {
            "model": self.client.model,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0},
            "attempts": 0,
        }
        self.output.append({**defaults, **record, "created": _utc_now()})
        self.failed += 1
        self.first_error = self.first_error or record["error"]
        self.bar.update(1)


def _settle(
    job: _Job, result: ChatResponse | ChatClientError, rules: ValidationRules, validation_retries: int
) -> tuple[str, Any]:
    """What one answer means for its clip: ("ok", rationale), ("retry", reason), ("unfinished", error: a
    rerun retries) or ("failed", error to record). An error that every request would hit is raised."""
    if isinstance(result, ChatClientError):
        if result.status in FATAL_STATUSES:
            raise result
        if result.status is None or result.status == 429 or result.status >= 500:
            return "unfinished", result
        return "failed", result  # the endpoint rejects this clip's request (400, 413, 422): retrying cannot help
    job.prompt_tokens += result.prompt_tokens
    job.completion_tokens += result.completion_tokens
    try:
        return "ok", validate_rationale(result.text, job.clip, rules, result.finish_reason)
    except InvalidRationale as err:
        return ("retry" if job.attempts <= validation_retries else "failed"), err


# ----- merging into a manifest -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MergeSummary:
    clips: int  # clips in the manifest
    merged: int  # clips that received a rationale from the file
    without: int  # clips left without a rationale
    failed: int  # failed lines of the file (not merged)
    unmatched: int  # rationales whose id is not in the manifest

    def __str__(self) -> str:
        return (
            f"merged {self.merged} of {self.clips} clips' rationales ({self.without} without one); "
            f"{self.failed} failed lines and {self.unmatched} ids not in the manifest were left out"
        )


def merge_rationales(
    manifest: str | Path, rationales: str | Path, out: str | Path, *, require_split: str | None = None
) -> MergeSummary:
    """Writes `out`: `manifest` with each clip's `rationale` set from the file's ok lines (other clips keep
    theirs). With `require_split`, every clip of that split must get one."""
    manifest, rationales, out = Path(manifest), Path(rationales), Path(out)
    if out.resolve() == manifest.resolve():
        raise ValueError(f"out: {out} is the input manifest; write the merged manifest to a new file")
    clips = read_manifest(manifest)
    records = read_rationales(rationales)
    texts = {key: record["rationale"] for key, record in records.items() if record["status"] == STATUS_OK}
    ids = {clip.id for clip in clips}
    merged = sum(clip.id in texts for clip in clips)
    if texts and not merged:
        raise RationaleFileError(f"{rationales}: none of its {len(texts)} ids is in {manifest} (another manifest?)")
    if require_split is not None:
        missing = [
            clip.id
            for clip in _select(clips, require_split, str(manifest))
            if clip.id not in texts and not clip.rationale
        ]
        if missing:
            raise RationaleFileError(
                f"{rationales}: {len(missing)} clips of split {require_split!r} have no rationale "
                f"(first: {', '.join(missing[:5])}); rerun `opsd-jax rationales` for them"
            )
    updated = [dataclasses.replace(clip, rationale=texts[clip.id]) if clip.id in texts else clip for clip in clips]
    write_manifest(out, updated)
    return MergeSummary(
        clips=len(clips),
        merged=merged,
        without=sum(not clip.rationale for clip in updated),
        failed=sum(record["status"] == STATUS_FAILED for record in records.values()),
        unmatched=sum(key not in ids for key in texts),
    )
