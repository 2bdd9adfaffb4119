"""`make demo`: does rationale-privileged self-distillation teach a student to read the media? An honest test.

Everything runs on the CPU with nothing downloaded, through the real pipeline, per seed:

1. **Data** (`data.py`). `synthetic_affect` clips: a drawn face whose mouth and brows carry valence, a
   voice whose pitch and energy carry arousal (together they decide the emotion), and a subtitle that
   names the clip's emotion with some probability and another one otherwise. Two conditions: `standard`
   (subtitles agree half the time, in training and at test) and `shortcut` (80% in training, chance at
   test, so a subtitle shortcut learned in training fails). A rule-based stand-in for the frontier model
   writes evidence-aware rationales through the real rationale interface; manifests become TFDS datasets.
2. **A tiny thinker** is initialised at random in Flax and exported as a Hugging Face checkpoint.
3. **Stage 0, warm start** (`run.warm_start`, cached): cross-entropy on the label given the teacher's
   prompt, whose media come from a random other clip (drawn independently of the label), so the thinker
   learns to read evidence written in its prompt and nothing about the media.
4. **The arms** (`arms.py`), each from the warm start under the same budget and learning rate, in each
   condition: OmniOPSD; teachers whose privileged context is only the label, or another clip's rationale;
   SFT on labels and on rationales; a label-reward policy gradient; SFT with the subtitle removed (the
   media-only reference: what the tiny model can learn from face and voice).
5. **Scores** (`evaluate.py`) with the student's prompt: accuracy and macro-F1 on all held-out clips, on
   those whose subtitle misleads, and with every clip's media swapped for another's (the drop is the
   arm's reliance on the media), next to chance, the subtitle-only baseline, the warm start and the
   teacher, and which cue each answer gets right (the face's valence, the voice's arousal). `report.py`
   writes them (mean ± std over seeds) to `results.md` / `results.json`, with a plot.

`perception.py` (`python -m opsd_jax.demo.perception CHECKPOINT`) probes the encoders' outputs directly:
whether the cues an arm misses are there for the language model to read.
"""

from opsd_jax.demo.arms import ARMS, DEFAULT_ARMS
from opsd_jax.demo.data import CONDITIONS

__all__ = ["ARMS", "CONDITIONS", "DEFAULT_ARMS"]
