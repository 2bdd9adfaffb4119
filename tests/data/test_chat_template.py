"""The prompt builder against the reference: the checkpoint's chat template (jinja, via the tokenizer), the
Qwen2.5-Omni processor's own placeholder methods (run on a bare instance: the full processor needs
torchvision), and the tiny reference thinker's encoders (placeholder counts = encoder output rows)."""

import shutil
import types

import numpy as np
import pytest

from opsd_jax.data import chat_template as ct
from opsd_jax.data.audio_features import audio_to_inputs
from opsd_jax.data.vision_inputs import image_to_inputs, video_to_inputs
from opsd_jax.testing.tokenizer import (
    EXTRA_SPECIAL_TOKENS,
    QWEN2_5_OMNI_CHAT_TEMPLATE,
    SPECIAL_TOKEN_IDS,
    build_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def builder(tokenizer_dir):
    return ct.PromptBuilder.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def processor(tokenizer):
    """A `Qwen2_5OmniProcessor` without its sub-processors: the attributes its `__init__` reads off the
    tokenizer, and the merge size its placeholder methods read off the image / video processors."""
    from transformers import Qwen2_5OmniProcessor

    processor = object.__new__(Qwen2_5OmniProcessor)
    processor.tokenizer = tokenizer
    processor.chat_template = tokenizer.chat_template  # a checkpoint's processor and tokenizer share it
    for name in ("image", "audio", "video"):
        setattr(processor, f"{name}_token", getattr(tokenizer, f"{name}_token"))
        setattr(processor, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    for name in ("vision_bos", "vision_eos", "audio_bos", "audio_eos"):
        setattr(processor, f"{name}_token", getattr(tokenizer, f"{name}_token"))
    processor.image_processor = types.SimpleNamespace(merge_size=2)
    processor.video_processor = types.SimpleNamespace(merge_size=2, temporal_patch_size=2)
    return processor


def processor_audio_tokens(feature_lengths):
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    return _get_feat_extract_output_lengths(np.asarray(feature_lengths))


def processor_video_replacement(processor, video: ct.VideoPart) -> str:
    video_inputs = dict(video_grid_thw=np.asarray([video.grid_thw]), video_second_per_grid=[video.second_per_grid])
    if video.audio_feature_length is None:
        return processor.replace_video_token(video_inputs, 0, load_audio_from_video=False)
    audio_inputs = dict(num_audio_tokens=processor_audio_tokens([video.audio_feature_length]))
    return processor.replace_video_with_audio_token(
        video_inputs, 0, audio_inputs, 0, position_id_per_seconds=25, seconds_per_chunk=2.0
    )


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_files_and_special_ids(tokenizer_dir, tokenizer):
    assert (tokenizer_dir / "tokenizer.json").is_file() and (tokenizer_dir / "tokenizer_config.json").is_file()
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKEN_IDS} == SPECIAL_TOKEN_IDS
    assert len(tokenizer) <= 256
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 207)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 209)
    for name, token in EXTRA_SPECIAL_TOKENS.items():
        assert getattr(tokenizer, name) == token
    assert (tokenizer.image_token_id, tokenizer.video_token_id, tokenizer.audio_token_id) == (201, 202, 200)


def test_tiny_tokenizer_round_trip(tokenizer):
    text = (
        "<|im_start|>user\n<|vision_bos|><|VIDEO|><|VIDEO|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>"
        'Is she happy, sad or angry? (say "neutral" if unsure)<|im_end|>\n<|im_start|>assistant\n'
    )
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[:7] == [208, *tokenizer("user\n")["input_ids"], 205, 202, 202, 206, 203][:7]
    assert ids.count(202) == 2 and ids.count(200) == 1 and max(ids) < 256


# ------------------------------------------------------------------------------------ placeholder layout


@pytest.mark.parametrize(
    "video",
    [
        ct.VideoPart((4, 20, 28), 1.0, 400),  # the reference doc's example (4 s, 8 frames)
        ct.VideoPart((2, 4, 4), 1.0, 350),  # 87 audio tokens over two chunks, video in one
        ct.VideoPart((3, 4, 6), 4.0, 1000),  # 4 s per temporal patch: gaps wider than a chunk
        ct.VideoPart((5, 6, 4), 2 / 1.7, 777),  # fractional seconds per patch
        ct.VideoPart((6, 2, 2), 1.0, 60),  # audio much shorter than the video
        ct.VideoPart((1, 2, 2), 1.0, 3001),  # audio much longer than the video
        ct.VideoPart((3, 4, 4), 0.5),  # no audio track
    ],
)
def test_video_placeholders_equal_processor_replacement(processor, video):
    expected = "<|vision_bos|>" + processor_video_replacement(processor, video) + "<|vision_eos|>"
    assert ct.render_part(video) == expected


def test_audio_in_video_layout_of_the_reference_doc_example():
    # Reference doc section 1.4: 4 s audio + 8 frames -> [vb][ab] Vx280 Ax50 Vx280 Ax50 [ae][ve].
    video = ct.VideoPart((4, 20, 28), 1.0, 400)
    assert ct.audio_in_video_runs(video) == [("video", 280), ("audio", 50), ("video", 280), ("audio", 50)]
    body = ("<|VIDEO|>" * 280 + "<|AUDIO|>" * 50) * 2
    expected = "<|vision_bos|><|audio_bos|>" + body + "<|audio_eos|><|vision_eos|>"
    assert ct.render_part(video) == expected


@pytest.mark.parametrize("frames", [1, 2, 3, 199, 200, 201, 350, 3000, 30000])
def test_audio_placeholders_equal_processor_replacement(processor, frames):
    audio_inputs = dict(num_audio_tokens=processor_audio_tokens([frames]))
    expected = "<|audio_bos|>" + processor.replace_audio_token(audio_inputs, 0) + "<|audio_eos|>"
    assert ct.render_part(ct.AudioPart(frames)) == expected


def conversation_parts():
    image, audio = ct.ImagePart((1, 8, 10)), ct.AudioPart(523)
    video_with_audio, silent_video = ct.VideoPart((3, 4, 6), 1.0, 280), ct.VideoPart((2, 4, 4), 0.5)
    return image, audio, video_with_audio, silent_video


def template_message(part):
    if isinstance(part, str):
        return {"type": "text", "text": part}
    kind = {ct.ImagePart: "image", ct.AudioPart: "audio", ct.VideoPart: "video"}[type(part)]
    return {"type": kind, kind: f"clip.{ {'image': 'jpg', 'audio': 'wav', 'video': 'mp4'}[kind] }"}


@pytest.mark.parametrize("system_prompt", [None, ct.QWEN_OMNI_SYSTEM_PROMPT])
def test_full_prompt_equals_chat_template_plus_processor_expansion(builder, tokenizer, processor, system_prompt):
    image, audio, video_with_audio, silent_video = conversation_parts()
    parts = [video_with_audio, 'Subtitle: "I can\'t believe it!"', image, audio, silent_video, "Which emotion?"]
    messages = [
        ct.Message("user", "Describe the clip."),
        ct.Message("assistant", "A person talks."),
        ct.Message("user", parts),
    ]
    if system_prompt is not None:
        messages.insert(0, ct.Message("system", system_prompt))

    template_messages = [
        {
            "role": m.role,
            "content": m.content if isinstance(m.content, str) else [template_message(part) for part in m.content],
        }
        for m in messages
    ]
    text = processor.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=True)
    image_inputs = dict(image_grid_thw=np.asarray([image.grid_thw]))
    audio_inputs = dict(num_audio_tokens=processor_audio_tokens([audio.feature_length]))
    expected, _ = processor.get_text_with_replacements(
        [text],
        images_replacements=[processor.replace_image_token(image_inputs, 0)],
        videos_replacements=[
            processor_video_replacement(processor, video_with_audio),
            processor_video_replacement(processor, silent_video),
        ],
        audio_replacements=[processor.replace_audio_token(audio_inputs, 0)],
    )
    got = builder.render(messages)
    assert got == expected[0]
    # Token for token: the processor tokenizes its expanded text with the same tokenizer.
    ids = builder([messages], length=None)["input_ids"][0].tolist()
    assert ids == tokenizer(expected[0])["input_ids"]
    assert got.startswith(f"<|im_start|>system\n{system_prompt or ct.DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    assert got.endswith("Which emotion?<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------------- the checkpoint's own chat template

# Qwen2.5-Omni's template with another default system prompt and a label before each video.
VARIANT_TEMPLATE = QWEN2_5_OMNI_CHAT_TEMPLATE.replace("You are a helpful assistant.", "You read faces.").replace(
    "<|vision_bos|><|VIDEO|>", "Clip: <|vision_bos|><|VIDEO|>"
)


def checkpoint_with_template(source, directory, template: str):
    shutil.copytree(source, directory)
    (directory / "chat_template.jinja").write_text(template)
    return directory


def test_the_checkpoint_template_reaches_the_input_ids(builder, tokenizer_dir, tmp_path):
    variant = ct.PromptBuilder.from_pretrained(
        checkpoint_with_template(tokenizer_dir, tmp_path / "v", VARIANT_TEMPLATE)
    )
    video = ct.VideoPart((2, 4, 4), 1.0, 120)
    messages = ct.user_prompt([video, "Which emotion?"])
    default_ids = builder([messages], length=None)["input_ids"][0].tolist()
    variant_ids = variant([messages], length=None)["input_ids"][0].tolist()
    assert variant_ids != default_ids
    text = variant.tokenizer.decode(variant_ids)
    assert text.startswith("<|im_start|>system\nYou read faces.<|im_end|>\n<|im_start|>user\nClip: <|vision_bos|>")
    # The expansion is the same under either template: the same placeholder runs.
    assert text.replace("You read faces.", ct.DEFAULT_SYSTEM_PROMPT).replace("Clip: ", "") == builder.tokenizer.decode(
        default_ids
    )
    assert variant_ids.count(SPECIAL_TOKEN_IDS["<|VIDEO|>"]) == ct.vision_token_count(video.grid_thw)


def test_a_template_that_drops_a_medium_or_none_at_all_is_named(tokenizer_dir, tmp_path):
    dropped = QWEN2_5_OMNI_CHAT_TEMPLATE.replace("<|audio_bos|><|AUDIO|><|audio_eos|>", "")
    builder = ct.PromptBuilder.from_pretrained(checkpoint_with_template(tokenizer_dir, tmp_path / "d", dropped))
    with pytest.raises(ValueError, match=r"chat template of checkpoint directory .*/d renders 0 audio placeholder"):
        builder.render(ct.user_prompt([ct.AudioPart(100), "Hi"]))
    bare = tmp_path / "bare"
    shutil.copytree(tokenizer_dir, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match=r"checkpoint directory .*bare has no chat template"):
        ct.PromptBuilder.from_pretrained(bare)


# ------------------------------------------------------------------------- counts vs the encoders' outputs


@pytest.fixture(scope="module")
def reference_thinker():
    from opsd_jax.testing.reference import build_reference_thinker, tiny_thinker_config_dict

    return build_reference_thinker(tiny_thinker_config_dict())


def test_placeholder_counts_equal_reference_encoder_outputs(builder, reference_thinker):
    import torch

    rng = np.random.default_rng(0)
    images = image_to_inputs(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))  # resized to 112x140
    videos = video_to_inputs(rng.integers(0, 256, (5, 56, 84, 3), dtype=np.uint8), sample_fps=2.0)
    # A standalone 2.3 s audio and the video's own 2.9 s track, in the order their tokens appear.
    audios = audio_to_inputs([0.1 * rng.standard_normal(36800), 0.1 * rng.standard_normal(46400)], max_samples=48000)
    lengths = audios["feature_attention_mask"].sum(-1).tolist()
    parts = [
        ct.ImagePart(images["image_grid_thw"][0]),
        ct.AudioPart(lengths[0]),
        ct.VideoPart(videos["video_grid_thw"][0], 2 / 2.0, lengths[1]),
        "How does she feel?",
    ]
    batch = builder([ct.user_prompt(parts), ct.user_prompt(["Hello."])], length=320)
    ids = batch["input_ids"][0]

    model = reference_thinker.model
    tensor = torch.from_numpy
    with torch.no_grad():
        image_rows = sum(
            len(x)
            for x in model.get_image_features(
                tensor(images["pixel_values"]), tensor(images["image_grid_thw"])
            ).pooler_output
        )
        video_rows = sum(
            len(x)
            for x in model.get_video_features(
                tensor(videos["pixel_values_videos"]), tensor(videos["video_grid_thw"])
            ).pooler_output
        )
        audio_rows = model.get_audio_features(
            tensor(audios["input_features"]), tensor(audios["feature_attention_mask"]).long()
        ).last_hidden_state
    assert (ids == 201).sum() == image_rows == 8 * 10 // 4
    assert (ids == 202).sum() == video_rows == 3 * 4 * 6 // 4
    # 230 and 290 mel frames: (230 - 1) // 2 + 1 = 115 -> (115 - 2) // 2 + 1 = 57; 145 -> 72.
    assert lengths == [230, 290]
    assert (ids == 200).sum() == len(audio_rows) == 57 + 72

    with torch.no_grad():  # the whole reference forward accepts the batch (it checks image / video counts)
        logits = reference_thinker(
            input_ids=tensor(batch["input_ids"]).long(),
            attention_mask=tensor(batch["attention_mask"]).long(),
            pixel_values=tensor(images["pixel_values"]),
            image_grid_thw=tensor(images["image_grid_thw"]),
            pixel_values_videos=tensor(videos["pixel_values_videos"]),
            video_grid_thw=tensor(videos["video_grid_thw"]),
            video_second_per_grid=tensor(videos["video_second_per_grid"]),
            input_features=tensor(audios["input_features"]),
            feature_attention_mask=tensor(audios["feature_attention_mask"]).long(),
            use_audio_in_video=True,
        ).logits
    assert logits.shape == (2, 320, 256) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------ tokenization


def test_encode_left_pads_to_the_length_bucket(builder, tokenizer):
    texts = [builder.render(ct.user_prompt(["Is he angry?"])), builder.render(ct.user_prompt([ct.AudioPart(40)]))]
    batch = builder.encode(texts, length=64)
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (2, 64)
    for row, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        np.testing.assert_array_equal(batch["input_ids"][row, 64 - len(ids) :], ids)
        assert (batch["input_ids"][row, : 64 - len(ids)] == 207).all()
        assert batch["attention_mask"][row].tolist() == [0] * (64 - len(ids)) + [1] * len(ids)
    assert tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1] == 1]) == texts[1]


def test_encode_names_the_bucket_a_prompt_overflows(builder, tokenizer):
    texts = ["short", builder.render(ct.user_prompt(["A longer prompt about a sad face."]))]
    count = len(tokenizer(texts[1])["input_ids"])
    with pytest.raises(ValueError, match=f"prompt 1 has {count} tokens, more than the length bucket 16"):
        builder.encode(texts, length=16)


def test_bad_parts_are_rejected():
    with pytest.raises(ValueError, match=r"ImagePart.grid_thw must be \(t, h, w\).*got \(1, 3, 4\)"):
        ct.ImagePart((1, 3, 4))
    with pytest.raises(ValueError, match="VideoPart.second_per_grid must be positive, got 0"):
        ct.VideoPart((2, 4, 4), 0)
    with pytest.raises(ValueError, match="Message.role must be one of"):
        ct.Message("narrator", "hi")
    with pytest.raises(TypeError, match=r"Message.content\[1\] must be str, ImagePart, VideoPart or AudioPart"):
        ct.Message("user", ["hi", 3])
