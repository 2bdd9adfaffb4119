"""The rationale request of one clip: frames as JPEG data URLs, the label and subtitle, task-aware wording."""

from __future__ import annotations

import base64
import io
import json
import wave

import numpy as np
import pytest
from PIL import Image

from opsd_jax.data.manifest import Clip
from opsd_jax.rationales import prompt
from opsd_jax.rationales.prompt import PromptOptions, build_messages, describe_label, rationale_prompt

DATA_URL_PREFIX = "data:image/jpeg;base64,"


def _frames(count: int, height: int = 56, width: int = 56) -> np.ndarray:
    """Smooth, distinct frames `[count, height, width, 3]` (gradients shifted per frame)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([(x * 255 // width + 30 * t) % 256, y * 255 // height, np.full_like(x, 40 * t % 256)], -1)
        for t in range(count)
    ]
    return np.asarray(frames, dtype=np.uint8)


def _clip(**fields) -> Clip:
    values = dict(id="clip_7", video="v.mp4", task="basic", label="angry", subtitle="I can't believe you did that!")
    values.update(fields)
    return Clip(**values)


def _parts(messages, kind):
    assert len(messages) == 1 and messages[0]["role"] == "user"
    return [part for part in messages[0]["content"] if part["type"] == kind]


def _text(messages) -> str:
    (part,) = _parts(messages, "text")
    return part["text"]


def _decode_image(part) -> Image.Image:
    url = part["image_url"]["url"]
    assert url.startswith(DATA_URL_PREFIX)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(DATA_URL_PREFIX) :], validate=True)))
    assert image.format == "JPEG"
    return image


def test_frames_are_jpeg_data_urls_before_the_text_in_time_order():
    frames = _frames(4)
    messages = build_messages(_clip(), frames, PromptOptions(jpeg_quality=95))
    content = messages[0]["content"]
    assert [part["type"] for part in content] == ["image_url"] * 4 + ["text"]
    for part, frame in zip(_parts(messages, "image_url"), frames):
        assert "detail" not in part["image_url"]  # left to the server unless asked for
        decoded = np.asarray(_decode_image(part).convert("RGB"), dtype=np.int16)
        assert decoded.shape == (56, 56, 3)
        # JPEG at quality 95 keeps smooth frames within a few grey levels (measured mean error 0.6 to 2.7).
        assert np.abs(decoded - frame).mean() < 4.0
    json.dumps(messages)  # the request body must serialise


def test_label_subtitle_and_rules_in_the_text():
    clip = _clip()
    text = _text(build_messages(clip, _frames(3)))
    assert text == rationale_prompt(clip, num_frames=3, with_audio=False, max_words=120)
    assert "The clip's emotion: angry." in text
    assert 'Transcript of what the person says: "I can\'t believe you did that!"' in text
    assert "3 frames" in text and "without audio" in text
    assert prompt.VOICE_CUES_WITHOUT_AUDIO in text and prompt.WORD_CUES in text
    assert prompt.TASK_FOCUS["basic"] in text
    assert "at most 120 words" in text
    assert "never say or imply that it was given to you" in text
    assert "clip_7" not in text  # the id tells the model nothing about the clip


def test_frames_are_shrunk_to_max_side_and_the_request_is_bounded():
    big = _frames(8, height=480, width=640)
    options = PromptOptions(max_side=128, image_detail="low")
    messages = build_messages(_clip(), big, options)
    for part in _parts(messages, "image_url"):
        assert part["image_url"]["detail"] == "low"
        assert _decode_image(part).size == (128, 96)  # aspect 4:3 kept, longest side 128
    size = len(json.dumps(messages))
    # Eight 128x96 JPEGs plus ~1.5 kB of text: measured 21.7 kB (120 kB at max_side=512).
    assert size < 32_000, size
    assert len(_text(messages)) < 2500
    small = build_messages(_clip(), big, PromptOptions(max_side=64))
    assert len(json.dumps(small)) < size  # the bound drives the size


def test_small_frames_are_never_upscaled():
    (part,) = _parts(build_messages(_clip(), _frames(1, 40, 20), PromptOptions(max_side=512)), "image_url")
    assert _decode_image(part).size == (20, 40)


def test_task_aware_wording():
    fine = _clip(task="fine_grained", label=None, labels=["happy", "relieved"])
    text = rationale_prompt(fine, num_frames=2, with_audio=False, max_words=80)
    assert "The clip's emotions: happy, relieved." in text and prompt.TASK_FOCUS["fine_grained"] in text
    assert "at most 80 words" in text
    assert describe_label(fine).words == ("happy", "relieved")

    mosi = _clip(task="sentiment", label=None, sentiment=1.5, dataset="cmumosi")
    text = rationale_prompt(mosi, num_frames=2, with_audio=False, max_words=80)
    assert "The clip's sentiment: positive (+1.5 on a scale from -3, most negative, to +3, most positive)." in text
    assert prompt.TASK_FOCUS["sentiment"] in text

    sims = _clip(task="sentiment", label=None, sentiment=-0.4, dataset="sims")
    assert describe_label(sims).text == "negative (-0.4 on a scale from -1, most negative, to +1, most positive)"
    unknown = _clip(task="sentiment", label=None, sentiment=0.0, dataset="")
    assert describe_label(unknown).text == "neutral (+0 where the sign gives the polarity)"
    assert describe_label(unknown).words == ("neutral",)


def test_empty_subtitle_asks_for_no_words():
    text = rationale_prompt(_clip(subtitle="  "), num_frames=1, with_audio=False, max_words=100)
    assert prompt.NO_TRANSCRIPT in text and prompt.NO_WORD_CUES in text and prompt.WORD_CUES not in text


def test_audio_part_is_a_wav_cut_to_the_bound():
    rate = 16000
    audio = np.sin(np.linspace(0, 2 * np.pi * 220, rate)).astype(np.float32) * 0.5  # 1 s
    messages = build_messages(
        _clip(), _frames(2), PromptOptions(max_audio_seconds=0.25), audio=audio, sampling_rate=rate
    )
    (part,) = _parts(messages, "input_audio")
    assert part["input_audio"]["format"] == "wav"
    with wave.open(io.BytesIO(base64.b64decode(part["input_audio"]["data"]))) as reader:
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, rate)
        samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    assert len(samples) == rate // 4
    np.testing.assert_allclose(samples / 32767.0, audio[: rate // 4], atol=1 / 32767)  # 16-bit quantisation
    text = _text(messages)
    assert "with its audio attached" in text and prompt.VOICE_CUES_WITH_AUDIO in text
    assert [part["type"] for part in messages[0]["content"]] == ["image_url", "image_url", "input_audio", "text"]


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(max_words=5), "max_words"),
        (dict(max_side=8), "max_side"),
        (dict(jpeg_quality=0), "jpeg_quality"),
        (dict(image_detail="medium"), "image_detail"),
        (dict(max_audio_seconds=0), "max_audio_seconds"),
    ],
)
def test_bad_options_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        PromptOptions(**fields)


def test_bad_frames_are_rejected():
    with pytest.raises(ValueError, match="frames"):
        build_messages(_clip(), np.zeros((0, 56, 56, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        build_messages(_clip(), np.zeros((1, 56, 56, 3), np.float32))
