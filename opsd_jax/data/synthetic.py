"""`synthetic_affect` content: tiny clips whose emotion follows from cues spread over face, voice and words.

Every clip shows a drawn face (frames), carries a hummed voice (16 kHz audio) and a subtitle. Its emotion
is fixed by a rule over two of the three modalities, so that no single cue is enough:

| face (valence)                                 | voice (arousal)                          | emotion   |
|------------------------------------------------|------------------------------------------|-----------|
| relaxed: mouth curves up, brows level          | aroused: high pitch (> 200 Hz), loud     | `happy`   |
| relaxed: mouth curves up, brows level          | calm: low pitch (< 200 Hz), soft         | `neutral` |
| tense: mouth curves down, brows drawn together | aroused: high pitch, loud                | `angry`   |
| tense: mouth curves down, brows drawn together | calm: low pitch, soft                    | `sad`     |

The face decides valence (the mouth's curvature; the brows agree with it), the voice decides arousal (the
pitch; the loudness agrees with it). The subtitle is a phrase typical of one emotion (`PHRASES`): the clip's
own with probability `agree_probability` (default 1/2), else one of another emotion, a distractor. So the
face alone or the voice alone leaves two emotions open (50 %), the words alone are right half the time,
and face and voice together always decide it (chance is 25 %).

Clips are deterministic: clip `index` of `split` is drawn from `np.random.default_rng([seed,
crc32(split), index])` and its emotion is `EMOTIONS[index % 4]` (balanced classes), whatever the split's
size. Each clip also varies in what carries no emotion: skin and background colours, a one-pixel head jitter
and a speaking mouth from frame to frame, syllable timing and intonation.

`read_face` and `read_voice` measure the cues back from frames and audio (they know the drawing's layout),
which is how the rule-based rationale writer (`opsd_jax.rationales.rule_based`) perceives a clip.

    clip = make_clip(np.random.default_rng(0), "angry")      # frames, audio, subtitle, label, cues
    config = SyntheticAffectConfig(name="demo", num_frames=4, height=56, width=56, max_audio_seconds=1.0,
                                   generator=SyntheticExamples({"train": 256, "test": 64}),
                                   splits=("train", "test"))
    manifest = write_synthetic_manifest("data/synthetic", n_train=256, n_test=64, seed=0)
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from opsd_jax.data.audio_features import SAMPLING_RATE
from opsd_jax.data.manifest import Clip, write_manifest
from opsd_jax.data.media import write_video

EMOTIONS = ("happy", "sad", "angry", "neutral")
EMOTION_OF = {
    ("positive", "high"): "happy",
    ("positive", "low"): "neutral",
    ("negative", "high"): "angry",
    ("negative", "low"): "sad",
}
VALENCE_AROUSAL = {emotion: cues for cues, emotion in EMOTION_OF.items()}
DATASET = "synthetic_affect"
TASK = "basic"

PHRASES = {
    "happy": (
        "what a great day",
        "I can't stop smiling",
        "this is wonderful news",
        "we actually won",
        "I love this so much",
        "best surprise ever",
        "everything worked out",
        "that made my week",
    ),
    "sad": (
        "I miss her so much",
        "nothing went right today",
        "I wish it were different",
        "it's over now",
        "I feel so alone",
        "we lost everything",
        "he never came back",
        "I couldn't save it",
    ),
    "angry": (
        "how dare you do this",
        "get out of my way",
        "I told you a hundred times",
        "this is completely unfair",
        "stop lying to me",
        "you ruined everything",
        "I've had enough of this",
        "don't you touch that",
    ),
    "neutral": (
        "the meeting starts at nine",
        "I'll take the bus home",
        "it's on the second shelf",
        "we need more paper",
        "the report is on your desk",
        "turn left at the corner",
        "dinner is at seven",
        "the train was on time",
    ),
}
_EMOTION_OF_PHRASE = {phrase: emotion for emotion, phrases in PHRASES.items() for phrase in phrases}

NUM_FRAMES = 4
SIZE = 56
FPS = 4  # NUM_FRAMES / FPS = 1 s of audio
AGREE_PROBABILITY = 0.5

# Cue ranges (margins around every threshold, so compression never flips a reading). Mouth curvature and brow
# slant are in units of the frame height: the mouth's centre sits `curve` below its corners (> 0 curves up);
# each brow's inner end drops `slant` per unit of width (> 0 drawn together).
MOUTH_CURVE = {"positive": (0.04, 0.08), "negative": (-0.08, -0.04)}
BROW_SLANT = {"positive": (-0.08, 0.08), "negative": (0.30, 0.55)}
PITCH_HZ = {"high": (230.0, 320.0), "low": (100.0, 160.0)}
LOUDNESS = {"high": (0.45, 0.70), "low": (0.08, 0.18)}  # peak scale of the voice, full scale = 1
BROW_THRESHOLD = 0.19
PITCH_THRESHOLD_HZ = 200.0
LOUDNESS_THRESHOLD = 0.3

# The drawing's layout, as fractions of the frame (rows of height, columns of width).
_FACE_CENTER, _FACE_RADII = (0.52, 0.5), (0.45, 0.40)
_BROW_ROW, _BROW_COLUMNS, _BROW_HALF_LENGTH = 0.27, (0.33, 0.67), 0.10
_EYE_ROW, _EYE_RADIUS = 0.45, 0.045
_MOUTH_ROW, _MOUTH_HALF_WIDTH, _MOUTH_MAX_OPENING = 0.72, 0.18, 0.04
_LINE_HALF_WIDTH = 0.016
_BROW_REGION, _MOUTH_REGION = (0.12, 0.37), (0.56, 0.92)
_FEATURE_RGB, _MOUTH_INSIDE_RGB = (30, 25, 25), (120, 40, 40)
_DARK = 90  # luma below this is a drawn feature; skin and background stay above ~140
# RMS of one period of the voice's waveform (harmonics 1 : 1/2 : 1/4, scaled to peak 1/1.75).
_VOICE_HARMONICS = (1.0, 0.5, 0.25)
_VOICE_SHAPE_RMS = float(np.sqrt(sum(a * a for a in _VOICE_HARMONICS) / 2) / sum(_VOICE_HARMONICS))


@dataclasses.dataclass(frozen=True)
class Cues:
    """The values that produced a clip. `words_emotion` is the emotion its subtitle's phrase is typical of."""

    mouth_curve: float
    brow_slant: float
    pitch_hz: float
    loudness: float
    words_emotion: str

    @property
    def valence(self) -> str:
        return face_valence(self.mouth_curve)

    @property
    def arousal(self) -> str:
        return voice_arousal(self.pitch_hz)

    def to_json(self) -> dict[str, Any]:
        return {
            "mouth_curve": round(self.mouth_curve, 6),
            "brow_slant": round(self.brow_slant, 6),
            "pitch_hz": round(self.pitch_hz, 4),
            "loudness": round(self.loudness, 6),
            "words_emotion": self.words_emotion,
            "valence": self.valence,
            "arousal": self.arousal,
        }


def face_valence(mouth_curve: float) -> str:
    return "positive" if mouth_curve > 0 else "negative"


def voice_arousal(pitch_hz: float) -> str:
    return "high" if pitch_hz > PITCH_THRESHOLD_HZ else "low"


def emotion_of(valence: str, arousal: str) -> str:
    """The labelling rule: face valence x voice arousal -> emotion (the table in the module docstring)."""
    if (valence, arousal) not in EMOTION_OF:
        raise ValueError(f"valence/arousal: expected positive|negative and high|low, got {valence!r}, {arousal!r}")
    return EMOTION_OF[(valence, arousal)]


def words_emotion(subtitle: str) -> str | None:
    """The emotion a subtitle's phrase is typical of (`PHRASES`), None for any other text."""
    return _EMOTION_OF_PHRASE.get(subtitle.strip())


def _check_emotion(label: str) -> str:
    if label not in VALENCE_AROUSAL:
        raise ValueError(f"label: expected one of {', '.join(EMOTIONS)}, got {label!r}")
    return label


def sample_cues(
    rng: np.random.Generator, label: str, *, agree_probability: float = AGREE_PROBABILITY
) -> tuple[Cues, str]:
    """(cues, subtitle) of a clip of emotion `label`."""
    valence, arousal = VALENCE_AROUSAL[_check_emotion(label)]
    if not 0.0 <= agree_probability <= 1.0:
        raise ValueError(f"agree_probability: expected a probability in [0, 1], got {agree_probability}")
    said = label if rng.random() < agree_probability else str(rng.choice([e for e in EMOTIONS if e != label]))
    subtitle = str(rng.choice(PHRASES[said]))
    cues = Cues(
        mouth_curve=float(rng.uniform(*MOUTH_CURVE[valence])),
        brow_slant=float(rng.uniform(*BROW_SLANT[valence])),
        pitch_hz=float(rng.uniform(*PITCH_HZ[arousal])),
        loudness=float(rng.uniform(*LOUDNESS[arousal])),
        words_emotion=said,
    )
    return cues, subtitle


# ----- the face --------------------------------------------------------------------------------------------


def render_face(
    cues: Cues, rng: np.random.Generator, *, num_frames: int = NUM_FRAMES, height: int = SIZE, width: int = SIZE
) -> np.ndarray:
    """`[num_frames, height, width, 3]` uint8 frames of a face showing `cues` (mouth curvature, brow slant);
    colours, a one-pixel head jitter and the speaking mouth's opening vary at random."""
    if num_frames < 1 or height < SIZE or width < SIZE:
        raise ValueError(
            f"num_frames, height, width: expected >= 1, >= {SIZE}, >= {SIZE}, got {num_frames}, {height}, {width}"
        )
    background = rng.uniform(150, 230, 3)
    skin = np.array([rng.uniform(200, 240), rng.uniform(160, 200), rng.uniform(130, 170)])
    offsets = rng.integers(-1, 2, (num_frames, 2))  # head jitter, pixels (rows, columns)
    openings = rng.uniform(0.0, _MOUTH_MAX_OPENING, num_frames) * (rng.random(num_frames) < 0.75)
    rows = np.arange(height, dtype=np.float64)[:, None] + 0.5
    columns = np.arange(width, dtype=np.float64)[None, :] + 0.5
    line = _LINE_HALF_WIDTH * height
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        y = rows - offsets[t, 0]
        x = columns - offsets[t, 1]
        image = np.broadcast_to(background, (height, width, 3)).copy()
        face = (
            ((y - _FACE_CENTER[0] * height) / (_FACE_RADII[0] * height)) ** 2
            + ((x - _FACE_CENTER[1] * width) / (_FACE_RADII[1] * width)) ** 2
        ) <= 1.0
        image[face] = skin
        features = np.zeros((height, width), bool)
        for side, center in zip((1.0, -1.0), _BROW_COLUMNS):  # the inner end (towards the nose) drops by slant
            brow_y = _BROW_ROW * height + side * cues.brow_slant * (x - center * width)
            features |= (np.abs(y - brow_y) <= line) & (np.abs(x - center * width) <= _BROW_HALF_LENGTH * width)
            eye_radius = _EYE_RADIUS * height
            features |= (y - _EYE_ROW * height) ** 2 + (x - center * width) ** 2 <= eye_radius**2
        u = (x - 0.5 * width) / (_MOUTH_HALF_WIDTH * width)
        within = np.abs(u) <= 1.0
        upper_lip = _MOUTH_ROW * height + cues.mouth_curve * height * (1.0 - u**2)
        lower_lip = upper_lip + openings[t] * height * (1.0 - u**2)
        inside = within & (y > upper_lip) & (y < lower_lip)
        image[inside] = _MOUTH_INSIDE_RGB
        features |= within & ((np.abs(y - upper_lip) <= line) | (np.abs(y - lower_lip) <= line))
        image[features] = _FEATURE_RGB
        frames[t] = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return frames


def luma(frames: np.ndarray) -> np.ndarray:
    """`[..., 3]` RGB -> `[...]` float64 brightness (ITU-R BT.601 weights, the codecs' Y)."""
    return frames[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _fit_rows(dark: np.ndarray, column_coordinates: np.ndarray, top_edge: bool) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) per column of `dark` [rows, columns] holding a dark pixel: its top edge or its mean row, counted
    from the region's top (only shapes are fitted, so the offset does not matter)."""
    present = dark.any(axis=0)
    rows = np.arange(dark.shape[0], dtype=np.float64)[:, None] + 0.5
    if top_edge:
        y = np.argmax(dark, axis=0).astype(np.float64) + 0.5
    else:
        y = (rows * dark).sum(axis=0) / np.maximum(dark.sum(axis=0), 1)
    return column_coordinates[present], y[present]


def read_face(frames: np.ndarray) -> tuple[float, float]:
    """(mouth curvature, brow slant) measured on `[T, H, W, 3]` uint8 frames of `render_face` (after any
    video or JPEG coding); medians over the frames, in the units of `Cues`. Raises when no face is found."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] < 3 or len(frames) == 0:
        raise ValueError(f"frames: expected [T >= 1, H, W, 3], got shape {frames.shape}")
    height, width = frames.shape[1:3]
    dark = luma(frames) < _DARK
    columns = np.arange(width, dtype=np.float64) + 0.5
    mouth_rows = slice(*(int(round(f * height)) for f in _MOUTH_REGION))
    mouth_columns = slice(*(int(round((0.5 + s * 1.2 * _MOUTH_HALF_WIDTH) * width)) for s in (-1, 1)))
    brow_rows = slice(*(int(round(f * height)) for f in _BROW_REGION))
    brow_columns = [
        slice(*(int(round((center + s * 1.2 * _BROW_HALF_LENGTH) * width)) for s in (-1, 1)))
        for center in _BROW_COLUMNS
    ]
    curves, slants = [], []
    for image in dark:
        # The upper lip's top edge: the speaking mouth's opening moves only the lower lip.
        x, y = _fit_rows(image[mouth_rows, mouth_columns], columns[mouth_columns], top_edge=True)
        if len(x) < 5:
            continue
        u2 = ((x - x.mean()) / (_MOUTH_HALF_WIDTH * width)) ** 2
        bend = np.polyfit(u2, y, 1)[0]  # y = centre + bend * u^2: the corners sit `bend` below the centre
        curves.append(-bend / height)
        sides = []
        for side, brow in zip((1.0, -1.0), brow_columns):
            x, y = _fit_rows(image[brow_rows, brow], columns[brow], top_edge=False)
            if len(x) >= 3:
                sides.append(side * np.polyfit(x, y, 1)[0])
        if len(sides) == 2:
            slants.append(float(np.mean(sides)))
    if not curves or not slants:
        raise ValueError(
            f"frames: no drawn face found (mouth in {len(curves)}, brows in {len(slants)} of {len(frames)} frames)"
        )
    return float(np.median(curves)), float(np.median(slants))


# ----- the voice -------------------------------------------------------------------------------------------


def synthesize_voice(
    cues: Cues, rng: np.random.Generator, *, seconds: float, sampling_rate: int = SAMPLING_RATE
) -> np.ndarray:
    """`[round(seconds * sampling_rate)]` float32: hummed syllables at `cues.pitch_hz` (each within +-3 %),
    peaking near `cues.loudness`, with a faint noise floor."""
    samples = int(round(seconds * sampling_rate))
    if samples < sampling_rate // 10:
        raise ValueError(f"seconds: expected at least 0.1 s of audio, got {seconds}")
    time = np.arange(samples) / sampling_rate
    frequency = np.full(samples, cues.pitch_hz)
    envelope = np.zeros(samples)
    start = rng.uniform(0.02, 0.08) * seconds
    while start < seconds - 0.1:
        length = min(rng.uniform(0.12, 0.25), seconds - start)
        inside = (time >= start) & (time < start + length)
        phase = (time[inside] - start) / length
        # flat-topped syllable: 20 % raised-cosine ramps at either end
        envelope[inside] = np.clip(np.minimum(phase, 1.0 - phase) / 0.2, 0.0, 1.0)
        envelope[inside] = 0.5 - 0.5 * np.cos(np.pi * envelope[inside])
        frequency[inside] = cues.pitch_hz * rng.uniform(0.97, 1.03)
        start += length + rng.uniform(0.04, 0.12)
    phase = 2.0 * np.pi * np.cumsum(frequency) / sampling_rate
    wave = sum(a * np.sin((k + 1) * phase) for k, a in enumerate(_VOICE_HARMONICS)) / sum(_VOICE_HARMONICS)
    voice = cues.loudness * envelope * wave + 0.003 * rng.standard_normal(samples)
    return voice.astype(np.float32)


def read_voice(audio: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> tuple[float, float]:
    """(pitch in Hz, loudness) measured on `synthesize_voice` audio (after any audio coding): the strongest
    spectral peak in 70-450 Hz, and the 90th percentile of 20 ms frame RMS over the waveform's RMS."""
    audio = np.asarray(audio, dtype=np.float64)
    frame = sampling_rate // 50
    if audio.ndim != 1 or audio.size < 4 * frame:
        raise ValueError(f"audio: expected a mono waveform of at least {4 * frame} samples, got shape {audio.shape}")
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    frequencies = np.fft.rfftfreq(audio.size, 1.0 / sampling_rate)
    band = (frequencies >= 70.0) & (frequencies <= 450.0)
    pitch = float(frequencies[band][np.argmax(spectrum[band])])
    frames = audio[: audio.size // frame * frame].reshape(-1, frame)
    level = float(np.percentile(np.sqrt((frames**2).mean(axis=1)), 90))
    return pitch, level / _VOICE_SHAPE_RMS


def read_cues(frames: np.ndarray, audio: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> dict[str, Any]:
    """What a clip's media show: the measured values, face valence, voice arousal and the rule's emotion."""
    mouth_curve, brow_slant = read_face(frames)
    pitch_hz, loudness = read_voice(audio, sampling_rate)
    valence, arousal = face_valence(mouth_curve), voice_arousal(pitch_hz)
    return {
        "mouth_curve": mouth_curve,
        "brow_slant": brow_slant,
        "pitch_hz": pitch_hz,
        "loudness": loudness,
        "valence": valence,
        "arousal": arousal,
        "emotion": emotion_of(valence, arousal),
        "brows_agree": (brow_slant > BROW_THRESHOLD) == (valence == "negative"),
        "loudness_agrees": (loudness > LOUDNESS_THRESHOLD) == (arousal == "high"),
    }


# ----- clips -----------------------------------------------------------------------------------------------


def make_clip(
    rng: np.random.Generator,
    label: str,
    *,
    num_frames: int = NUM_FRAMES,
    height: int = SIZE,
    width: int = SIZE,
    fps: int = FPS,
    agree_probability: float = AGREE_PROBABILITY,
) -> dict[str, Any]:
    """One clip of emotion `label`: `frames [num_frames, height, width, 3]` uint8, `audio [num_frames / fps *
    16000]` float32, `fps`, `subtitle`, `label` and the `cues` (a `Cues`) that produced them."""
    if fps < 1:
        raise ValueError(f"fps: expected a positive integer, got {fps}")
    cues, subtitle = sample_cues(rng, label, agree_probability=agree_probability)
    frames = render_face(cues, rng, num_frames=num_frames, height=height, width=width)
    audio = synthesize_voice(cues, rng, seconds=num_frames / fps)
    return {"frames": frames, "audio": audio, "fps": fps, "subtitle": subtitle, "label": label, "cues": cues}


def clip_id(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def clip_at(seed: int, split: str, index: int, **options) -> dict[str, Any]:
    """Clip `index` of `split` (`make_clip(**options)`, plus its `id`): the same for any split size."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    return {"id": clip_id(split, index), **make_clip(rng, EMOTIONS[index % len(EMOTIONS)], **options)}


@dataclasses.dataclass(frozen=True)
class SyntheticExamples:
    """The `SyntheticAffectConfig.generator`: `sizes[split]` clips per split at the config's frame shape
    (audio `num_frames / fps` seconds, cut to the config's length), seeded by `config.seed`.
    `rationales` (id -> text, e.g. the ok lines of a rationales file) fill the examples' `rationale`."""

    sizes: Mapping[str, int]
    fps: int = FPS
    agree_probability: float = AGREE_PROBABILITY
    rationales: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for split, size in self.sizes.items():
            if not isinstance(size, int) or size < 0:
                raise ValueError(f"sizes[{split!r}]: expected a non-negative integer, got {size!r}")

    def __call__(self, split: str, config) -> Iterator[dict[str, Any]]:
        if split not in self.sizes:
            raise ValueError(f"split {split!r}: SyntheticExamples has sizes only for {', '.join(self.sizes)}")
        for index in range(self.sizes[split]):
            clip = clip_at(
                config.seed,
                split,
                index,
                num_frames=config.num_frames,
                height=config.height,
                width=config.width,
                fps=self.fps,
                agree_probability=self.agree_probability,
            )
            yield dict(
                id=clip["id"],
                frames=clip["frames"],
                sample_fps=float(self.fps),
                audio=clip["audio"],
                task=TASK,
                subtitle=clip["subtitle"],
                label=clip["label"],
                dataset=DATASET,
                rationale=self.rationales.get(clip["id"]),
            )


def write_synthetic_manifest(
    directory: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    num_frames: int = NUM_FRAMES,
    size: int = SIZE,
    fps: int = FPS,
    agree_probability: float = AGREE_PROBABILITY,
    test_agree_probability: float | None = None,
) -> Path:
    """Writes `directory/video/<id>.mp4` (frames plus an AAC audio track), `directory/manifest.jsonl`
    (splits `train` and `test`) and `directory/cues.jsonl` (per clip: id, split, label, subtitle and the
    `Cues`); returns the manifest's path. `test_agree_probability` (default: `agree_probability`) lets the
    test split's subtitles agree with the label at another rate than the training split's (a shift: a
    subtitle shortcut learned in training fails at test)."""
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    directory = Path(directory)
    agree = {
        "train": agree_probability,
        "test": agree_probability if test_agree_probability is None else test_agree_probability,
    }
    clips, cue_lines = [], []
    for split, count in (("train", n_train), ("test", n_test)):
        for index in range(count):
            clip = clip_at(
                seed,
                split,
                index,
                num_frames=num_frames,
                height=size,
                width=size,
                fps=fps,
                agree_probability=agree[split],
            )
            video = write_video(directory / "video" / f"{clip['id']}.mp4", clip["frames"], fps, audio=clip["audio"])
            clips.append(
                Clip(
                    id=clip["id"],
                    video=video.resolve(),
                    task=TASK,
                    subtitle=clip["subtitle"],
                    label=clip["label"],
                    dataset=DATASET,
                    split=split,
                )
            )
            cue_lines.append(
                json.dumps(
                    {
                        "id": clip["id"],
                        "split": split,
                        "label": clip["label"],
                        "subtitle": clip["subtitle"],
                        **clip["cues"].to_json(),
                    }
                )
            )
    (directory / "cues.jsonl").write_text("".join(line + "\n" for line in cue_lines), encoding="utf-8")
    return write_manifest(directory / "manifest.jsonl", clips)
