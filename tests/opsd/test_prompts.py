"""Student and teacher prompts: one template, the privileged block where configured, aligned buckets."""

from __future__ import annotations

import pytest

from opsd_jax.config import ConfigError
from opsd_jax.data import chat_template as ct
from opsd_jax.opsd.prompts import PromptConfig, conversation, encode_prompt_pairs

MEDIA = [ct.VideoPart((1, 4, 4), 1.0, 97)]
RATIONALE = "Her brows are raised and her voice is loud: surprise."


@pytest.mark.parametrize("position", ["before_instruction", "after_instruction", "system"])
def test_teacher_prompt_is_the_student_prompt_plus_the_block(position, tiny_prompt_builder):
    config = PromptConfig(privileged_position=position)
    student = tiny_prompt_builder.render(conversation(MEDIA, "Oh my god!", config))
    teacher = tiny_prompt_builder.render(conversation(MEDIA, "Oh my god!", config, rationale=RATIONALE))
    block = config.privileged_template.format(rationale=RATIONALE)
    assert block not in student and RATIONALE not in student
    assert teacher.count(block) == 1
    # Removing the block (and the line breaks joining it) gives back the student's prompt exactly.
    joined = (
        "\n\n" + block if position == "system" else block + "\n" if position == "before_instruction" else "\n" + block
    )
    assert teacher.replace(joined, "") == student
    instruction_at = teacher.index(config.instruction)
    if position == "before_instruction":
        assert teacher.index(block) < instruction_at
    elif position == "after_instruction":
        assert teacher.index(block) > instruction_at
    else:
        assert teacher.index(block) < teacher.index("<|im_start|>user")


def test_pairs_share_one_bucket_so_completions_align(tiny_prompt_builder):
    pairs = encode_prompt_pairs(
        tiny_prompt_builder,
        [MEDIA, []],
        ["Oh my god!", ""],
        [RATIONALE, "A calm, flat voice."],
        PromptConfig(),
        length=400,
    )
    assert {v.shape for v in pairs.values()} == {(2, 400)}
    for side in ("student", "teacher"):
        assert (pairs[f"{side}_attention_mask"][:, -1] == 1).all(), "prompts end at the last column"
    assert (pairs["teacher_attention_mask"].sum(1) > pairs["student_attention_mask"].sum(1)).all()
    # The media placeholders are identical in both prompts.
    for row in range(2):
        s, t = pairs["student_input_ids"][row], pairs["teacher_input_ids"][row]
        assert (s == 202).sum() == (t == 202).sum() and (s == 200).sum() == (t == 200).sum()


def test_a_teacher_prompt_too_long_for_the_bucket_names_it(tiny_prompt_builder):
    with pytest.raises(ValueError, match="more than the length bucket 60"):
        encode_prompt_pairs(tiny_prompt_builder, [MEDIA], ["hi"], [RATIONALE], PromptConfig(), length=60)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"prompt\.privileged_template: must contain the field \{rationale\}"):
        PromptConfig(privileged_template="no field").validate()
    with pytest.raises(ConfigError, match=r"prompt\.privileged_position"):
        PromptConfig(privileged_position="middle").validate()  # type: ignore[arg-type]
