"""The demo's arms: what each trains on, with which objective, and which prompts it is evaluated on.

Every arm starts from the same warm start, trains `DemoSize.arm_steps` steps of `train.batch_size` clips
at the same learning rate (`train.lr` of configs/demo_tiny.yaml, no per-arm search: one rule for all, the
LoRA arm included: see `LORA`),
with the encoders trained (`train.train_encoders`; `media_only_sft_frozen_encoders` shows why), and
is evaluated with the student's prompt only (media and, except the media-only reference, the subtitle).
The teacher arms differ only in the privileged context of the teacher's prompt (`data.py`'s datasets).

A teacher without privileged context is not an arm: a frozen copy of the warm start given the student's
own prompt *is* the student at step 0, so its divergence is zero and it teaches nothing by construction;
any variant that is not zero (another temperature, a live copy) tests sharpening or self-training, not
privileged evidence. The label-privileged and mismatched-rationale teachers are the controls that can fail.
"""

from __future__ import annotations

import dataclasses

DISTILL = ["teacher.distill_weight=1.0"]
SFT_LABELS = ["teacher.distill_weight=0.0", "teacher.label_ce_weight=1.0"]
# Adapters on every linear layer of the thinker (decoder, both encoders, merger, head): the demo's full
# fine-tune trains the encoders too (`train.train_encoders`), so the LoRA arm adapts them as well.
# Its learning rate is every arm's. LoRA's best rate is often ~10x full fine-tuning's (an adapter's update
# reaches a weight through a @ b, b starting at zero; Schulman et al., "LoRA Without Regret", Thinking
# Machines 2025), and configs/qwen2_5_omni_7b_lora_*.yaml use 10x the 7B's 1e-6; in this demo 10x broke the
# student (seeds 0-2: 8.3 +- 14.4% held out, most answers unparseable) and 3x did not learn (seed 0: 25.0%;
# 1x: 29.2%).
LORA = ["model.lora.rank=8", "model.lora.alpha=16", "model.lora.target_modules=.*"]


@dataclasses.dataclass(frozen=True)
class Arm:
    """overrides: on top of configs/demo_tiny.yaml. train: the `data.py` dataset it trains on.
    subtitles: whether its student prompts (training and evaluation) hold the subtitle."""

    overrides: tuple[str, ...]
    train: str = "main"
    subtitles: bool = True
    description: str = ""


ARMS: dict[str, Arm] = {
    "omniopsd": Arm(tuple(DISTILL), description="frozen teacher with the clip's rationale (OmniOPSD)"),
    "omniopsd_lora": Arm(
        (*DISTILL, *LORA),
        description="OmniOPSD training rank-8 LoRA adapters on every linear layer, the frozen base as the teacher "
        "(the warm start, as omniopsd's frozen teacher), at the learning rate of every other arm",
    ),
    "label_teacher": Arm(
        tuple(DISTILL),
        train="label",
        description="frozen teacher whose privileged context is only the ground-truth label",
    ),
    "mismatched_teacher": Arm(
        tuple(DISTILL), train="mismatched", description="frozen teacher with another (random) clip's rationale"
    ),
    "sft_labels": Arm(tuple(SFT_LABELS), description="cross-entropy on the label, student prompt"),
    "sft_rationales": Arm(
        (
            *SFT_LABELS,
            "teacher.label_ce_target=rationale",
            "data.answer_length=224",
            "sampling.eval_max_new_tokens=224",
        ),
        description="cross-entropy on rationale then label (imitation), student prompt",
    ),
    "grpo_label_reward": Arm(
        ("teacher.distill_weight=0.0", "teacher.label_pg_weight=1.0"),
        description="policy gradient on a 0/1 label reward, group-normalised",
    ),
    "media_only_sft": Arm(
        tuple(SFT_LABELS),
        train="no_subtitle",
        subtitles=False,
        description="reference: cross-entropy on the label with the subtitle removed",
    ),
    "media_only_sft_frozen_encoders": Arm(
        (*SFT_LABELS, "train.train_encoders=false"),
        train="no_subtitle",
        subtitles=False,
        description="the same with the vision and audio encoders frozen (every other arm trains them)",
    ),
}

# The arms `make demo` runs by default (about 10-15 minutes on a 2-core machine); `--arms all` runs all, the
# LoRA arm among them (README: it does not learn here, so it is not among the first results a user sees).
DEFAULT_ARMS = ("omniopsd", "label_teacher", "sft_labels", "media_only_sft")
