"""A rule-based stand-in for the frontier model, for the synthetic task (`opsd_jax.data.synthetic`).

It is served the way a real model is: `RuleBasedServer` is an OpenAI-compatible chat-completions endpoint on
127.0.0.1 (standard-library `http.server`, one thread per request, started and stopped by its context
manager), so `generate_rationales` and `ChatClient` run against it unchanged and write the usual
rationales JSONL (resumable, validated, mergeable with `merge_rationales`).

It reads each request the way a model would, from what the request holds and nothing else: the frames
(the JPEG `image_url` parts) give the face, measured with `synthetic.read_face`; the audio (the
`input_audio` WAV part, so requests must be built with `include_audio=True`) gives the voice, measured with
`synthetic.read_voice`; the prompt text gives the transcript and the true emotion. The real prompt carries
no clip id, and none is needed: the measured cues are the clip's. Its answer names the face cue, the voice
cue, whether the words agree, and the emotion (`write_rationale`):

    The mouth curves up and the brows lie level: a relaxed, pleasant face. The voice is high-pitched and
    loud: an energetic voice. The words "what a great day" fit that. A pleasant face with an energetic voice
    makes this happy.

When the measured face and voice imply another emotion than the prompt's (media that are not the synthetic
task's), it answers HTTP 422, which `generate_rationales` records as a failed line: it never writes a
rationale its evidence does not support.

    summary = write_rule_based_rationales("data/synthetic/manifest.jsonl", "data/synthetic/rationales.jsonl")
    merge_rationales("data/synthetic/manifest.jsonl", "data/synthetic/rationales.jsonl",
                     "data/synthetic/manifest_with_rationales.jsonl", require_split="train")
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
import time
import wave
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from opsd_jax.data import synthetic
from opsd_jax.data.manifest import Clip
from opsd_jax.rationales.client import ChatClient
from opsd_jax.rationales.generate import RunSummary, generate_rationales
from opsd_jax.rationales.prompt import NO_TRANSCRIPT

MODEL_NAME = "rule-based-affect"
MAX_BODY_BYTES = 32 * 1024 * 1024
_TRANSCRIPT = re.compile(r"Transcript of what the person says: (.*)$", re.MULTILINE)
_EMOTION = re.compile(r"^The clip's emotion: (.+)\.$", re.MULTILINE)

FACE_WORDS = {
    "positive": ("The mouth curves up and the brows lie level", "a relaxed, pleasant face", "a pleasant face"),
    "negative": (
        "The mouth curves down and the brows are drawn together, slanting toward the nose",
        "a tense, displeased face",
        "a displeased face",
    ),
}
VOICE_WORDS = {
    "high": ("The voice is high-pitched and loud", "an energetic voice", "an energetic voice"),
    "low": ("The voice is low-pitched and soft", "a subdued voice", "a subdued voice"),
}


class Unanswerable(ValueError):
    """A request the stand-in cannot answer; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def write_rationale(valence: str, arousal: str, subtitle: str, emotion: str) -> str:
    """The rationale for a clip whose face shows `valence` (positive | negative), whose voice shows `arousal`
    (high | low) and which says `subtitle`; `emotion` is the rule's outcome (`synthetic.emotion_of`)."""
    if valence not in FACE_WORDS or arousal not in VOICE_WORDS:
        raise ValueError(f"valence/arousal: expected positive|negative and high|low, got {valence!r}, {arousal!r}")
    face, face_reading, face_short = FACE_WORDS[valence]
    voice, voice_reading, voice_short = VOICE_WORDS[arousal]
    subtitle = subtitle.strip()
    said = synthetic.words_emotion(subtitle)
    if not subtitle:
        words = "Nothing is said."
    elif said is None:
        words = f'The words "{subtitle}" carry no clear feeling.'
    elif said == emotion:
        words = f'The words "{subtitle}" fit that.'
    else:
        words = f'The words "{subtitle}" sound {said}, but the face and the voice outweigh them.'
    return (
        f"{face}: {face_reading}. {voice}: {voice_reading}. {words} "
        f"{face_short.capitalize()} with {voice_short} makes this {emotion}."
    )


# ----- reading a request -----------------------------------------------------------------------------------


def _decode_base64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Unanswerable(f"{what}: not valid base64") from None


def _image(part: dict[str, Any]) -> np.ndarray:
    url = (part.get("image_url") or {}).get("url", "")
    header, _, data = url.partition(",")
    if not header.startswith("data:image/") or ";base64" not in header:
        raise Unanswerable(f"image_url: expected a base64 data URL, got {url[:40]!r}")
    try:
        return np.asarray(Image.open(io.BytesIO(_decode_base64(data, "image_url"))).convert("RGB"))
    except OSError as err:
        raise Unanswerable(f"image_url: not a readable image ({err})") from None


def _audio(part: dict[str, Any]) -> tuple[np.ndarray, int]:
    audio = part.get("input_audio") or {}
    if audio.get("format") != "wav":
        raise Unanswerable(f"input_audio: expected format 'wav', got {audio.get('format')!r}")
    try:
        with wave.open(io.BytesIO(_decode_base64(audio.get("data", ""), "input_audio")), "rb") as reader:
            if reader.getsampwidth() != 2:
                raise Unanswerable(f"input_audio: expected 16-bit PCM, got {8 * reader.getsampwidth()}-bit")
            pcm = np.frombuffer(reader.readframes(reader.getnframes()), "<i2").reshape(-1, reader.getnchannels())
            return pcm.mean(axis=1) / 32768.0, reader.getframerate()
    except (wave.Error, EOFError) as err:
        raise Unanswerable(f"input_audio: not a readable WAV ({err})") from None


def _prompt_fields(text: str) -> tuple[str, str]:
    """(transcript, emotion) from the filled `RATIONALE_PROMPT` of a basic-emotion clip."""
    transcript, emotion = _TRANSCRIPT.search(text), _EMOTION.search(text)
    if transcript is None or emotion is None:
        raise Unanswerable(
            "the prompt holds no 'Transcript of what the person says:' line or no "
            '"The clip\'s emotion: ..." line (only basic-emotion rationale prompts are answered)'
        )
    quoted = transcript.group(1).strip()
    if quoted == NO_TRANSCRIPT:
        return "", emotion.group(1)
    if len(quoted) < 2 or not (quoted.startswith('"') and quoted.endswith('"')):
        raise Unanswerable(f"transcript: expected a quoted line, got {quoted[:60]!r}")
    return quoted[1:-1], emotion.group(1)


def answer(messages: Sequence[dict[str, Any]]) -> str:
    """The rationale for one rationale request (`prompt.build_messages` with audio); raises `Unanswerable`."""
    if not messages or not isinstance(messages[-1], dict) or not isinstance(messages[-1].get("content"), list):
        raise Unanswerable("messages: expected a last message whose content is a list of parts")
    parts = messages[-1]["content"]
    frames = [_image(part) for part in parts if part.get("type") == "image_url"]
    sounds = [_audio(part) for part in parts if part.get("type") == "input_audio"]
    texts = [part.get("text", "") for part in parts if part.get("type") == "text"]
    if not frames or len(sounds) != 1 or not texts:
        raise Unanswerable(
            f"content: expected image_url parts, one input_audio part and the prompt text, got "
            f"{len(frames)} images, {len(sounds)} audio parts, {len(texts)} texts "
            f"(send the audio: generate_rationales(..., include_audio=True))"
        )
    subtitle, emotion = _prompt_fields(texts[-1])
    if {frame.shape for frame in frames} != {frames[0].shape}:
        raise Unanswerable(f"image_url: expected frames of one size, got {sorted({f.shape for f in frames})}")
    try:
        cues = synthetic.read_cues(np.stack(frames), *sounds[0])
    except ValueError as err:
        raise Unanswerable(f"the media show no synthetic-task cues: {err}", status=422) from None
    if cues["emotion"] != emotion:
        raise Unanswerable(
            f"the face ({cues['valence']} valence) and the voice ({cues['arousal']} arousal) show "
            f"{cues['emotion']}, not {emotion!r}; no rationale for it",
            status=422,
        )
    return write_rationale(cues["valence"], cues["arousal"], subtitle, emotion)


# ----- the endpoint ----------------------------------------------------------------------------------------


class RuleBasedServer:
    """`answer` behind POST {base_url}/chat/completions on 127.0.0.1 (a free port unless `port` is given).

    Use as a context manager: the server thread starts on entry and is shut down and joined on exit.
    `usage` counts whitespace-separated words, not tokens. Bodies over `max_body_bytes` get 413."""

    def __init__(self, *, port: int = 0, max_body_bytes: int = MAX_BODY_BYTES, timeout_s: float = 30.0):
        self.requests = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s  # a stalled client cannot hold a thread forever

            def log_message(self, *args):  # the client reports failures; no per-request noise
                pass

            def do_POST(self):
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, _error(f"no route {self.path}; POST /v1/chat/completions"))
                length = int(self.headers.get("Content-Length") or 0)
                if length <= 0 or length > max_body_bytes:
                    return self._send(
                        413 if length > 0 else 411,
                        _error(f"Content-Length {length}: expected 1 to {max_body_bytes} bytes"),
                    )
                try:
                    body = json.loads(self.rfile.read(length))
                    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                        raise Unanswerable("body: expected a JSON object with a 'messages' list")
                    text = answer(body["messages"])
                except json.JSONDecodeError as err:
                    return self._send(400, _error(f"body: not JSON ({err.msg})"))
                except Unanswerable as err:
                    return self._send(err.status, _error(str(err)))
                with owner._lock:
                    owner.requests += 1
                prompt_words = sum(
                    len(str(part.get("text", "")).split())
                    for message in body["messages"]
                    for part in (message.get("content") or [])
                    if isinstance(part, dict)
                )
                completion_words = len(text.split())
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-rule-{owner.requests}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model") or MODEL_NAME,
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                        "usage": {
                            "prompt_tokens": prompt_words,
                            "completion_tokens": completion_words,
                            "total_tokens": prompt_words + completion_words,
                        },
                    },
                )

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> RuleBasedServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="rule-based-rationales", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error"}}


def write_rule_based_rationales(
    manifest: str | Path | Sequence[Clip],
    out_jsonl: str | Path,
    *,
    split: str | None = "train",
    frames_per_clip: int = synthetic.NUM_FRAMES,
    concurrency: int = 2,
    limit: int | None = None,
    progress: bool = False,
) -> RunSummary:
    """Starts a `RuleBasedServer`, runs `generate_rationales` against it (frames and audio sent) for the
    clips of `split` (None: all) that `out_jsonl` lacks, stops the server; returns the run's summary."""
    with RuleBasedServer() as server:
        client = ChatClient(
            server.base_url, MODEL_NAME, api_key_env=None, timeout_s=60.0, max_retries=2, max_concurrency=concurrency
        )
        return generate_rationales(
            manifest,
            out_jsonl,
            client,
            frames_per_clip=frames_per_clip,
            split=split,
            limit=limit,
            include_audio=True,
            progress=progress,
        )
