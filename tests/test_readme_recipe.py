"""The README's "What a run looks like", run as written: every `opsd-jax ...` line of its ```bash block, in
order, through the CLI's `main`, on a tiny MER2023 pack, the tiny thinker and a fake rationale endpoint.

The commands are read from README.md, never copied here, so a flag renamed in the code but not in the README
(or the reverse) fails this test. The only changes to a command are the ones below, each explicit:

* `PLACEHOLDERS`: the README's stand-ins for a user's files and endpoint, replaced inside any word
  (`model.checkpoint=/ckpt/Qwen2.5-Omni-7B` -> `model.checkpoint=<the tiny thinker>`); every one must occur.
* Relative paths (`mer2023.jsonl`, `runs/7b`, `hf_export/`, `emotion_wheel/`, `clip.mp4`) stay as typed:
  the commands run in a fresh working directory, where `clip.mp4` is a clip of the pack (the user's clip).
* `APPENDED`: words added at the end of a command, to bring the 7B config and full-size clips down to the
  tiny thinker on 8 CPU devices (the shipped config is still the one loaded; everything not named here,
  such as bf16 compute, remat, the EMA teacher, G = 8, 2 accumulation steps and the data 4 x fsdp mesh,
  runs as configured), and to point `eval fetch-wheels` at a local copy of the wheel files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest

from opsd_jax.cli import main, parse_command_line
from tests.eval.conftest import merunibench_dir
from tests.eval.fake_chat_server import FakeChatServer, Reply
from tests.eval.test_fetch import StaticServer
from tests.mer_pack import write_mer2023_pack

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## What a run looks like"

# The pack: 2 training clips (one optimizer step of train.batch_size=2) and 2 test clips.
LABELS = {
    "test1_corpus": {"t1": {"emo": "happy"}, "t2": {"emo": "sad"}},
    "train_corpus": {"r1": {"emo": "angry"}, "r2": {"emo": "neutral"}},
}
SUBTITLES = {"t1": "I won!", "r1": "Go away.", "r2": "Fine."}
RATIONALE = "Brows drawn together, the jaw set, a clipped and forceful voice: the face, voice and words agree."
API_KEY = "sk-readme-recipe-test"

# The README's stand-ins for a user's files and endpoint: the MER2023 pack, the Qwen2.5-Omni-7B checkpoint, the
# TFDS data directory, the rationale endpoint (replaced by the tiny pack, the tiny thinker, a temporary
# directory and the fake endpoint on 127.0.0.1).
PLACEHOLDERS = ("/data/MER2023", "/ckpt/Qwen2.5-Omni-7B", "/data/tensorflow_datasets", "https://api.example.com/v1")

# Appended words, by command (the words before its first flag).
TINY_CLIPS = ["--num-frames", "2", "--height", "28", "--width", "28", "--max-audio-seconds", "0.5"]  # 1 video token
PROMPT_LENGTH = 384  # the tiny clips' prompts, the teacher's with its rationale, fit one bucket of this
TINY_BUCKETS = [f"data.prompt_length={PROMPT_LENGTH}", f"sampling.prompt_buckets=[{PROMPT_LENGTH}]"]
TINY_TRAINING = [
    "train.batch_size=2",  # 2 accumulation steps of 1 prompt x G = 8 rollouts: one row per device
    "train.total_steps=2",
    "train.warmup_steps=0",
    "sampling.max_new_tokens=4",
    "sampling.eval_max_new_tokens=4",
    "data.eval_clips=2",  # the pack's test split
    "data.worker_count=0",  # no grain worker processes (memory on a shared machine)
]
APPENDED = {
    ("data", "check"): [*TINY_CLIPS, *TINY_BUCKETS],
    ("data", "build"): TINY_CLIPS,
    ("train",): [*TINY_BUCKETS, *TINY_TRAINING],
    ("eval", "fetch-wheels"): ["--base-url", "{wheels_url}"],
}
# What the block runs, in order: a step added to or dropped from the README must be added here too.
RECIPE = [
    ("data", "convert"),
    ("rationales",),
    ("rationales", "merge"),
    ("data", "check"),
    ("data", "build"),
    ("train",),
    ("export",),
    ("eval", "fetch-wheels"),
    ("eval",),
    ("generate",),
]


def readme_commands(text: str) -> list[list[str]]:
    """The words after `opsd-jax` of each command line of the section's ```bash block (comments dropped)."""
    block = text.split(SECTION, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        assert words[0] == "opsd-jax", f"README: a line of the recipe that is not an opsd-jax command: {line}"
        commands.append(words[1:])
    return commands


def command_key(words: list[str]) -> tuple[str, ...]:
    """The command's name: its words before the first flag, e.g. ("data", "build"), ("eval",)."""
    return tuple(itertools.takewhile(lambda word: not word.startswith("-"), words))


@dataclasses.dataclass
class Ran:
    argv: list[str]
    code: int
    out: str
    err: str
    seconds: float


@dataclasses.dataclass
class Recipe:
    workdir: Path
    ran: dict[tuple[str, ...], Ran]
    endpoint: FakeChatServer

    def result(self, key: tuple[str, ...]) -> Ran:
        if key not in self.ran:
            pytest.fail(f"`opsd-jax {' '.join(key)}` did not run: an earlier command of the recipe failed")
        return self.ran[key]


def substitute(words: list[str], placeholders: dict[str, str], used: set[str], **urls: str) -> list[str]:
    """`words` with the placeholders replaced (a whole path or a path's leading directories, after `KEY=` or
    alone) and the command's `APPENDED` words added."""
    out = []
    for word in words:
        for placeholder, value in placeholders.items():
            pattern = rf"(?:(?<==)|^){re.escape(placeholder)}(?=/|$)"
            if re.search(pattern, word):
                used.add(placeholder)
                word = re.sub(pattern, lambda _, value=value: value, word)
        out.append(word)
    return out + [word.format(**urls) for word in APPENDED.get(command_key(words), [])]


@pytest.fixture(scope="module")
def recipe(tiny_checkpoint, tmp_path_factory) -> Recipe:
    root = tmp_path_factory.mktemp("readme_recipe")
    pack = write_mer2023_pack(root / "MER2023", LABELS, SUBTITLES)
    workdir = root / "work"
    workdir.mkdir()
    shutil.copy(pack / "video" / "t1.mp4", workdir / "clip.mp4")
    endpoint = FakeChatServer(lambda request, attempt: Reply(text=RATIONALE))
    placeholders = {  # PLACEHOLDERS' stand-ins
        "/data/MER2023": str(pack),
        "/ckpt/Qwen2.5-Omni-7B": str(tiny_checkpoint),
        "/data/tensorflow_datasets": str(root / "tensorflow_datasets"),
        "https://api.example.com/v1": endpoint.base_url,  # bound to its port already, serving once entered
    }
    commands = readme_commands(README.read_text(encoding="utf-8"))
    ran: dict[tuple[str, ...], Ran] = {}
    used: set[str] = set()
    with endpoint, StaticServer(merunibench_dir()) as wheels, pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setenv("OPENAI_API_KEY", API_KEY)
        for words in commands:
            argv = substitute(words, placeholders, used, wheels_url=wheels.url + "/emotion_wheel")
            out, err = io.StringIO(), io.StringIO()
            began = time.perf_counter()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exit:  # argparse refused the command line
                    code = exit.code
            ran[command_key(words)] = Ran(argv, code, out.getvalue(), err.getvalue(), time.perf_counter() - began)
            if code != 0:
                break
    assert set(placeholders) == set(PLACEHOLDERS)
    return Recipe(workdir, ran, endpoint)


def test_the_recipe_is_the_steps_this_test_knows_and_every_command_parses():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert [command_key(words) for words in commands] == RECIPE
    used: set[str] = set()
    for words in commands:  # a flag the parser does not know fails here in seconds, not after training
        argv = substitute(
            words, {placeholder: placeholder for placeholder in PLACEHOLDERS}, used, wheels_url="http://127.0.0.1:1"
        )
        try:
            parse_command_line(argv)
        except SystemExit:
            pytest.fail(f"README: `opsd-jax {shlex.join(words)}` is refused by the command-line parser")
    assert used == set(PLACEHOLDERS), f"README: placeholders not in the recipe: {set(PLACEHOLDERS) - used}"


def test_every_command_of_the_recipe_succeeds(recipe):
    for key in RECIPE:
        ran = recipe.result(key)
        assert ran.code == 0, (
            f"`opsd-jax {shlex.join(ran.argv)}` exited {ran.code}:\n{ran.out[-2000:]}\n{ran.err[-3000:]}"
        )
    print({" ".join(key): round(ran.seconds, 1) for key, ran in recipe.ran.items()})


def test_rationales_are_written_for_the_training_clips_and_reach_the_dataset(recipe):
    from opsd_jax.data.builders import load_split

    assert "wrote 4 clips (test: 2, train: 2)" in recipe.result(("data", "convert")).out
    lines = [json.loads(line) for line in (recipe.workdir / "rationales.jsonl").read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == ["r1", "r2"]  # --split train
    assert {request["model"] for request in recipe.endpoint.requests} == {"gpt-4.1"}
    assert {headers["Authorization"] for headers in recipe.endpoint.headers} == {f"Bearer {API_KEY}"}
    merged = [json.loads(line) for line in (recipe.workdir / "mer2023_r.jsonl").read_text().splitlines()]
    assert {clip["id"]: bool(clip.get("rationale")) for clip in merged} == {
        "t1": False,
        "t2": False,
        "r1": True,
        "r2": True,
    }
    assert "no problems (media, labels and prompt lengths)" in recipe.result(("data", "check")).out
    # The directory `data build` prints is the one the README's train command names.
    printed = recipe.result(("data", "build")).out.strip().splitlines()[-1].removeprefix("data.train_dir=")
    assert f"data.train_dir={printed}" in recipe.result(("train",)).argv
    assert {
        example["id"].decode(): example["rationale"].decode() for example in load_split(Path(printed), "train")
    } == {"r1": RATIONALE, "r2": RATIONALE}


def test_training_checkpoints_and_the_readers_use_the_run(recipe):
    run_dir = recipe.workdir / "runs" / "7b"
    assert "trained to step 2" in recipe.result(("train",)).out
    config = (run_dir / "config.yaml").read_text()
    assert "mode: ema" in config and "remat: true" in config  # the shipped 7B config, shrunk only where APPENDED
    assert (recipe.workdir / "hf_export" / "config.json").is_file()
    assert len(list((recipe.workdir / "emotion_wheel").iterdir())) == 7
    scores = json.loads((recipe.workdir / "eval_results" / "7b" / "scores.json").read_text())
    assert "mer2023" in json.dumps(scores)
    predictions = (recipe.workdir / "eval_results" / "7b" / "predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in predictions) == ["t1", "t2"]  # the test split
    assert recipe.result(("generate",)).out.strip()
