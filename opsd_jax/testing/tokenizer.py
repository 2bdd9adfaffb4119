"""A tiny Qwen2.5-Omni-style tokenizer for the tiny test models (vocabulary 210 <= the tiny vocab_size 256).

A byte-level BPE trained with `tokenizers` on a few sentences, saved as a transformers `Qwen2Tokenizer`
(tokenizer.json, tokenizer_config.json, chat_template.jinja) so that `AutoTokenizer.from_pretrained` loads
it exactly as it loads a real checkpoint's tokenizer. The special tokens sit at the ids of the tiny model
config (`opsd_jax.testing.reference.TINY_TOKEN_IDS`), and the multimodal token names are registered as the
`extra_special_tokens` the Qwen2.5-Omni processor reads (`tokenizer.image_token`, ...).

Only printable ASCII and newline are in the byte alphabet (the full 256 bytes do not fit under 200 ids):
other characters have no token and are dropped when encoding.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel

# Special tokens at fixed ids: 200-206 are the tiny config's multimodal ids; pad and eos follow.
SPECIAL_TOKEN_IDS = {
    "<|AUDIO|>": 200,
    "<|IMAGE|>": 201,
    "<|VIDEO|>": 202,
    "<|audio_bos|>": 203,
    "<|audio_eos|>": 204,
    "<|vision_bos|>": 205,
    "<|vision_eos|>": 206,
    "<|endoftext|>": 207,
    "<|im_start|>": 208,
    "<|im_end|>": 209,
}
NUM_REGULAR_TOKENS = 200  # ids 0-199: byte alphabet + learned merges
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"

# The names the Qwen2.5-Omni processor reads off its tokenizer (reference doc section 6.1).
EXTRA_SPECIAL_TOKENS = {
    "audio_token": "<|AUDIO|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}

# The chat template shipped with Qwen/Qwen2.5-Omni-7B and -3B (also used by transformers' processor tests).
QWEN2_5_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_SENTENCES = (
    "You are a helpful assistant.",
    "What emotion does the person in the video express? Answer with one word.",
    "The speaker sounds happy and excited, smiling with a bright voice.",
    "She is angry and frustrated; her tone is sharp and loud.",
    "He looks sad and worried, speaking slowly with a low voice.",
    "A neutral face and a calm, flat tone: no clear emotion.",
    "They seem surprised, then fearful, and finally disgusted.",
    'Subtitle: "I can\'t believe you did that!" (laughs)',
    "Rationale: the raised eyebrows and the rising pitch suggest surprise.",
    "happy sad angry neutral surprise fear disgust worried excited calm",
)


def _ascii_byte_alphabet() -> list[str]:
    """Byte-level symbols of printable ASCII and newline (the bytes the training text needs)."""
    byte_level = ByteLevel(add_prefix_space=False, use_regex=False)
    return [byte_level.pre_tokenize_str(chr(code))[0][0] for code in [0x0A, *range(0x20, 0x7F)]]


def build_tiny_tokenizer(directory: str | Path):
    """Trains the tiny BPE, saves it into `directory` and returns the tokenizer reloaded from there with
    `AutoTokenizer.from_pretrained` (so callers test the files, not the in-memory object)."""
    from transformers import AutoTokenizer, Qwen2Tokenizer  # slow to import; only this builder needs it
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # transformers: as above

    alphabet = _ascii_byte_alphabet()
    trainer_model = Tokenizer(models.BPE())
    # The same pre-tokenisation as Qwen2Tokenizer, so the merges are the ones it will apply.
    trainer_model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_REGULAR_TOKENS,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        special_tokens=[],
        show_progress=False,
    )
    trainer_model.train_from_iterator(TRAINING_SENTENCES, trainer)
    trained = json.loads(trainer_model.to_str())["model"]
    vocab = dict(trained["vocab"])
    if sorted(vocab.values()) != list(range(NUM_REGULAR_TOKENS)) or set(vocab) & set(SPECIAL_TOKEN_IDS):
        raise RuntimeError(
            f"the trained BPE vocabulary must fill ids 0-{NUM_REGULAR_TOKENS - 1} exactly, got {len(vocab)} tokens"
        )
    vocab.update(SPECIAL_TOKEN_IDS)
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in trained["merges"]]

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
    )
    # Registering them as added special tokens makes them atomic in text; being in the vocabulary already,
    # they keep their fixed ids.
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKEN_IDS], special_tokens=True
    )
    tokenizer.chat_template = QWEN2_5_OMNI_CHAT_TEMPLATE
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)

    loaded = AutoTokenizer.from_pretrained(directory)
    ids = {token: loaded.convert_tokens_to_ids(token) for token in SPECIAL_TOKEN_IDS}
    if ids != SPECIAL_TOKEN_IDS or len(loaded) != NUM_REGULAR_TOKENS + len(SPECIAL_TOKEN_IDS):
        raise RuntimeError(
            f"saved tokenizer has special ids {ids} and {len(loaded)} tokens; "
            f"expected {SPECIAL_TOKEN_IDS} and {NUM_REGULAR_TOKENS + len(SPECIAL_TOKEN_IDS)}"
        )
    return loaded
