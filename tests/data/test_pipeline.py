"""The grain pipeline over a built `mer` dataset: processor arrays of the written media, per-process shards,
per-epoch shuffles, exact resumption from a saved iterator state, worker processes, mesh placement."""

import json

import jax
import numpy as np
import pytest

from opsd_jax.config import MeshConfig
from opsd_jax.data import media
from opsd_jax.data.audio_features import audio_to_inputs
from opsd_jax.data.builders import MerConfig, build_mer, load_split
from opsd_jax.data.pipeline import PipelineConfig, make_iterator, to_model_inputs
from opsd_jax.data.vision_inputs import video_to_inputs
from opsd_jax.sharding import make_mesh, resolve_rules

NUM_CLIPS = 8
MAX_SAMPLES = 16000  # max_audio_seconds=1.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(train source, {id: (video path, audio path)}): 8 clips of 0.6-1.3 s, each with its own tone; odd
    clips take their audio from a separate wav."""
    root = tmp_path_factory.mktemp("pipeline_clips")
    rng = np.random.default_rng(1)
    lines, paths = [], {}
    for index in range(NUM_CLIPS):
        seconds = 0.6 + 0.1 * index
        tone = 0.3 * np.sin(2 * np.pi * (200 + 100 * index) * np.arange(int(seconds * 16000)) / 16000)
        frames = rng.integers(0, 256, (int(seconds * 10), 48, 64, 3), dtype=np.uint8)
        video = media.write_video(root / f"clip{index}.mp4", frames, 10, audio=None if index % 2 else tone)
        audio = media.write_wav(root / f"clip{index}.wav", tone) if index % 2 else None
        paths[f"clip{index}"] = (video, audio or video)
        lines.append(
            {
                "id": f"clip{index}",
                "video": video.name,
                "audio": audio and audio.name,
                "task": "basic",
                "label": ("happy", "sad")[index % 2],
                "subtitle": f"line {index}",
                "dataset": "test",
            }
        )
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset_dir = build_mer(
        root / "manifest.jsonl",
        tmp_path_factory.mktemp("tfds"),
        MerConfig(name="pipeline", num_frames=4, height=56, width=56, max_audio_seconds=1.0),
    )
    return load_split(dataset_dir, "train"), paths


def take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def ids(batches) -> list[str]:
    return [str(name) for batch in batches for name in batch["id"]]


def single_process(**overrides) -> PipelineConfig:
    return PipelineConfig(**({"batch_size": 2, "shard_index": 0, "shard_count": 1} | overrides))


def test_batches_hold_the_processor_arrays_of_the_written_media(dataset):
    source, paths = dataset
    batches = list(make_iterator(source, single_process(num_epochs=1, shuffle=False)))
    assert len(batches) == NUM_CLIPS // 2
    for batch in batches:
        assert batch["pixel_values_videos"].shape == (2, 2 * 4 * 4, 1176)  # (T/2) * (56/14)^2 rows per clip
        assert batch["input_features"].shape == (2, 128, 100) and batch["feature_attention_mask"].shape == (2, 100)
        np.testing.assert_array_equal(batch["video_grid_thw"], [[2, 4, 4]] * 2)
        for row, name in enumerate(batch["id"]):
            video_path, audio_path = paths[name]
            video = media.read_video(video_path, num_frames=4, size=(56, 56))
            expected = video_to_inputs(video.frames, video.sample_fps)
            np.testing.assert_array_equal(batch["pixel_values_videos"][row], expected["pixel_values_videos"])
            assert batch["video_second_per_grid"][row] == pytest.approx(2 / video.sample_fps)
            waveform = media.read_audio(audio_path)[:MAX_SAMPLES]
            audio = audio_to_inputs(waveform, max_samples=MAX_SAMPLES)
            np.testing.assert_array_equal(batch["input_features"][row], audio["input_features"][0])
            np.testing.assert_array_equal(batch["feature_attention_mask"][row], audio["feature_attention_mask"][0])
            index = int(name.removeprefix("clip"))
            assert batch["label"][row] == ("happy", "sad")[index % 2] and batch["subtitle"][row] == f"line {index}"
            assert batch["task"][row] == "basic" and batch["labels"][row] == "" and np.isnan(batch["sentiment"][row])
    model = to_model_inputs(batches[0])
    assert model["pixel_values_videos"].shape == (2 * 32, 1176)
    np.testing.assert_array_equal(model["pixel_values_videos"][32:], batches[0]["pixel_values_videos"][1])


def test_process_shards_are_disjoint_complete_and_equal(dataset):
    source, _ = dataset
    shards = [
        ids(make_iterator(source, PipelineConfig(batch_size=2, seed=5, num_epochs=1, shard_index=index, shard_count=2)))
        for index in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == NUM_CLIPS // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(f"clip{index}" for index in range(NUM_CLIPS))
    # 8 clips over 3 processes: 2 each (the 2 left over are dropped, so every process runs as many steps).
    thirds = [
        ids(make_iterator(source, PipelineConfig(batch_size=1, seed=5, num_epochs=1, shard_index=index, shard_count=3)))
        for index in range(3)
    ]
    assert [len(shard) for shard in thirds] == [2, 2, 2] and len(set(sum(thirds, []))) == 6


def test_every_epoch_is_a_new_seeded_permutation(dataset):
    source, _ = dataset
    stream = ids(make_iterator(source, single_process(num_epochs=3, seed=7)))
    epochs = [stream[start : start + NUM_CLIPS] for start in range(0, 3 * NUM_CLIPS, NUM_CLIPS)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(f"clip{index}" for index in range(NUM_CLIPS))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert ids(make_iterator(source, single_process(num_epochs=3, seed=7))) == stream
    assert ids(make_iterator(source, single_process(num_epochs=1, seed=8))) != epochs[0]


def assert_same_batches(left: list[dict], right: list[dict]) -> None:
    assert ids(left) == ids(right)
    for a, b in zip(left, right):
        for name in ("pixel_values_videos", "input_features", "video_second_per_grid"):
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_a_restored_iterator_continues_exactly_on_the_mesh(dataset):
    source, _ = dataset
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=1), devices=jax.devices()[:2])
    config = single_process(seed=3)  # repeats forever
    uninterrupted = take(make_iterator(source, config, mesh=mesh), 7)
    first = make_iterator(source, config, mesh=mesh)
    take(first, 3)
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    resumed = make_iterator(source, config, mesh=mesh)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), uninterrupted[3:])
    placed = uninterrupted[0]["input_features"]
    assert isinstance(placed, jax.Array) and len(placed.addressable_shards) == 2
    assert placed.addressable_shards[0].data.shape == (1, 128, 100)  # the batch axis split over "data"
    assert isinstance(uninterrupted[0]["id"], np.ndarray)  # text stays on the host
    # The run's logical-axis table places the batches: rows off the mesh when `batch` maps to no axis.
    kept = next(make_iterator(source, config, mesh=mesh, rules=resolve_rules({"batch": None})))
    assert kept["input_features"].sharding.is_fully_replicated


def test_worker_processes_give_the_same_batches_and_resume(dataset):
    source, _ = dataset
    reference = list(make_iterator(source, single_process(num_epochs=1, seed=11)))
    config = single_process(num_epochs=1, seed=11, worker_count=2)
    iterator = make_iterator(source, config)
    head = take(iterator, 1)
    state = iterator.get_state()
    assert_same_batches(head + list(iterator), reference)
    resumed = make_iterator(source, config)
    resumed.set_state(state)
    assert_same_batches(list(resumed), reference[1:])
    iterator.close()
    resumed.close()


def test_a_caller_preprocess_replaces_the_default(dataset):
    source, paths = dataset

    def lengths(example):
        return {"id": example["id"].decode(), "audio_length": example["audio_length"]}

    (batch,) = take(make_iterator(source, single_process(batch_size=8, shuffle=False), preprocess=lengths), 1)
    assert set(batch) == {"id", "audio_length"} and batch["audio_length"].shape == (8,)
    for name, length in zip(batch["id"], batch["audio_length"]):
        assert length == min(len(media.read_audio(paths[name][1])), MAX_SAMPLES)


def test_a_shard_smaller_than_a_batch_is_an_error(dataset):
    with pytest.raises(
        ValueError,
        match=r"a shard of 4 examples \(8 examples over 2 processes\) cannot fill one "
        r"batch of batch_size=5",
    ):
        make_iterator(dataset[0], PipelineConfig(batch_size=5, shard_index=0, shard_count=2))


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(batch_size=2, shard_index=1), "shard_index and shard_count must be given together"),
        (dict(batch_size=2, shard_index=2, shard_count=2), r"shard_index must be in \[0, shard_count=2\)"),
        (dict(batch_size=2, num_epochs=0), "num_epochs must be >= 1 or None"),
        (dict(batch_size=2, worker_count=-1), "worker_count must be >= 0"),
    ],
)
def test_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**config)


def test_default_shard_is_this_process():
    assert PipelineConfig(batch_size=1).shard() == (jax.process_index(), jax.process_count()) == (0, 1)
