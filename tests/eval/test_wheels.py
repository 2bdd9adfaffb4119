"""Emotion-wheel normalisation G_k on the benchmark's own files, quirks included."""

from __future__ import annotations

import csv
import re

import openpyxl
import pytest

from opsd_jax.eval.wheels import (
    WHEEL_DIRECTORY_FILES,
    WheelFilesError,
    innermost_level_map,
    load_emotion_wheels,
    read_synonyms,
    read_wheel,
    read_word_forms,
    split_label_string,
)

# The reference document's table (merunibench.md §2a): basic label -> level1 word in wheels 1..5.
BASIC_LABEL_TABLE = {
    "angry": ("mad", "angry", "mad", "anger", "mad"),
    "anger": ("mad", "angry", "mad", "anger", "mad"),
    "happy": ("happy", "happy", "joyful", "joy", "powerful"),
    "joy": ("happy", "happy", "joyful", "joy", "powerful"),
    "sad": ("sad", "sad", "sad", "sad", "sad"),
    "sadness": ("sad", "sad", "sad", "sad", "sad"),
    "worried": ("scared", "fearful", "scared", "fear", "scared"),
    "surprise": ("surprised", "surprised", "powerful", "fear", None),
    "disgust": ("disgusted", "disgusted", None, "disgust", None),
    "fear": ("scared", "happy", "joyful", "genius", "joyful"),
    "neutral": (None, None, None, None, None),
}
LEVEL1_WORDS = (
    {"mad", "disgusted", "sad", "happy", "surprised", "scared"},
    {"fearful", "angry", "disgusted", "sad", "surprised", "happy", "bad"},
    {"mad", "scared", "joyful", "powerful", "peaceful", "sad"},
    {"joy", "genius", "anger", "sad", "fear", "disgust"},
    {"mad", "scared", "sad", "peaceful", "powerful", "joyful"},
)
# (level1, level2, level3) word counts per wheel, from the reference document §6.
LEVEL_COUNTS = ((6, 36, 72), (7, 41, 82), (6, 36, 36), (6, 48, 48), (6, 36, 36))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[dissatisfied, disappointed, bored]", ["dissatisfied", "disappointed", "bored"]),
        ("['Happy', \"sad\"]", ["Happy", "sad"]),
        ("happy,, sad ,", ["happy", "sad"]),
        ("[]", []),
        ("", []),
        ("[", []),
        (None, []),
        (["kept", " as is "], ["kept", " as is "]),
        ("at one's wits' end", ["at one", "s wits", "end"]),  # quotes split, as upstream
    ],
)
def test_split_label_string_matches_the_benchmark_rule(text, expected):
    assert split_label_string(text) == expected


def test_basic_labels_map_as_in_the_reference_table(wheels):
    for label, expected in BASIC_LABEL_TABLE.items():
        assert wheels.map_word_all(label) == expected, label
        for wheel, word in enumerate(expected, start=1):
            assert wheels.map_word(label, wheel) == word


def test_named_quirks(wheels):
    assert wheels.normalise(["neutral"], 1) == frozenset()  # neutral is in no file
    assert [wheels.map_word("fear", k) for k in (2, 3, 4)] == [
        "happy",
        "joyful",
        "genius",
    ]  # fear is a form of fearless
    assert wheels.map_word("happy", 5) == "powerful"
    assert wheels.map_word("surprise", 5) is None and wheels.map_word("surprise", 3) == "powerful"
    assert wheels.map_word("disgust", 3) is None and wheels.map_word("disgust", 5) is None
    assert wheels.map_word("  Happy ", 1) == "happy"  # lowercased and stripped first
    assert wheels.map_word("not-a-word", 1) is None


def test_fear_goes_through_fearless_by_the_alphabetically_first_rule(wheel_dir, wheels):
    forms = read_word_forms(wheel_dir / "format.csv")
    assert "fearless" in forms["fear"]
    trees = [read_wheel(wheel_dir / f"wheel{k}.xlsx") for k in range(1, 6)]
    synonyms = read_synonyms(wheel_dir / "synonym.xlsx", {w for tree in trees for w in innermost_level_map(tree)})
    candidates = sorted(set().union(*(synonyms[base] for base in forms["fear"])))
    wheel2 = innermost_level_map(trees[1])
    in_wheel2 = [c for c in candidates if c in wheel2]
    # Several candidates are in wheel 2 and disagree; the first in alphabetical order decides.
    assert len({wheel2[c] for c in in_wheel2}) > 1
    assert wheels.map_word("fear", 2) == wheel2[in_wheel2[0]] == "happy"


def test_level_structure_and_sizes(wheel_dir, wheels):
    for k, (expected_words, (n1, n2, n3)) in enumerate(zip(LEVEL1_WORDS, LEVEL_COUNTS), start=1):
        tree = read_wheel(wheel_dir / f"wheel{k}.xlsx")
        assert set(tree) == expected_words == set(wheels.level1_words[k - 1])
        assert (len(tree), sum(map(len, tree.values())), sum(len(l3) for b in tree.values() for l3 in b.values())) == (
            n1,
            n2,
            n3,
        )
    assert len(wheels.vocabulary) == 7386
    trees = [read_wheel(wheel_dir / f"wheel{k}.xlsx") for k in range(1, 6)]
    wheel_words = {w for tree in trees for w in innermost_level_map(tree)}
    assert len(wheel_words) == 253
    assert len(read_synonyms(wheel_dir / "synonym.xlsx", wheel_words)) == 1255


def test_blank_cells_carry_down(wheel_dir, wheels):
    # wheel1.xlsx row 3 holds only level3 "Insulated" (a word-list oddity kept as is) under Mad / Offended.
    tree = read_wheel(wheel_dir / "wheel1.xlsx")
    assert tree["mad"]["offended"] == ["skeptical", "insulated"]
    assert wheels.map_word("insulated", 1) == "mad"


def _independent_normalisation(wheel_dir):
    """A direct transcription of upstream's read_format2raws / read_candidate_synonym_merge /
    func_get_wheel_cluster / func_backward_case3, built from the raw files with csv and openpyxl."""

    def to_list(text):
        if not text:
            return []
        text = text[1:] if text[0] == "[" else text
        text = text[:-1] if text and text[-1] == "]" else text
        return [item.strip() for item in re.split("['\",]", text) if item.strip() not in ("", ",")]

    format2raws = {}
    with open(wheel_dir / "format.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for item in to_list(row["format"]):
                format2raws.setdefault(item, []).append(row["name"])
            format2raws.setdefault(row["name"], []).append(row["name"])
    sheet = openpyxl.load_workbook(wheel_dir / "synonym.xlsx").active
    header = [cell.value for cell in sheet[1]]
    raw_mapping = {}
    for run in range(1, 9):
        one_run = {}
        for row in sheet.iter_rows(min_row=2, values_only=True):
            raw = row[header.index(f"word_run{run}")].strip().lower()
            one_run.setdefault(raw, []).append(raw)
            for synonym in to_list(row[header.index(f"synonym_run{run}")]):
                one_run.setdefault(synonym.strip().lower(), []).append(raw)
        for key, value in one_run.items():
            raw_mapping[key] = list(set(raw_mapping.get(key, []) + value))
    wheel_maps = []
    for k in range(1, 6):
        sheet = openpyxl.load_workbook(wheel_dir / f"wheel{k}.xlsx").active
        levels, wheel_map = ["", "", ""], {}
        for row in sheet.iter_rows(min_row=2, values_only=True):
            levels = [(value if value is not None else old).lower().strip() for value, old in zip(row[:3], levels)]
            for word in levels:
                wheel_map[word] = levels[0]
        wheel_maps.append(wheel_map)

    def backward(label, wheel_map):
        if label not in format2raws:
            return None
        whole = [raw for fmt in format2raws[label] for raw in raw_mapping[fmt]]
        for candidate in sorted(whole):
            if candidate in wheel_map:
                return wheel_map[candidate]
        return None

    return format2raws, lambda label, k: backward(label, wheel_maps[k - 1])


def test_every_word_form_matches_an_independent_transcription(wheel_dir, wheels):
    forms, backward = _independent_normalisation(wheel_dir)
    assert set(forms) == wheels.vocabulary
    mismatches = [(form, k) for form in forms for k in range(1, 6) if backward(form, k) != wheels.map_word(form, k)]
    assert not mismatches, mismatches[:10]


def test_missing_directory_and_files_name_the_file_and_the_remedy(tmp_path, tiny_wheel_dir):
    with pytest.raises(WheelFilesError, match="does not exist.*fetch-wheels"):
        load_emotion_wheels(tmp_path / "absent")
    # Link (not copy) every file but synonym.xlsx.
    for name in WHEEL_DIRECTORY_FILES:
        if name != "synonym.xlsx":
            (tmp_path / name).symlink_to(tiny_wheel_dir / name)
    with pytest.raises(WheelFilesError) as info:
        load_emotion_wheels(tmp_path)
    message = str(info.value)
    for needed in (
        "synonym.xlsx",
        "synonyms",
        "AffectGPT/emotion_wheel/synonym.xlsx",
        "zeroQiaoba/AffectGPT",
        "opsd-jax eval fetch-wheels",
    ):
        assert needed in message


def test_malformed_format_file_names_the_columns(tmp_path):
    (tmp_path / "format.csv").write_text("word,forms\nhappy,happiness\n")
    with pytest.raises(WheelFilesError, match="expected columns 'name' and 'format'"):
        read_word_forms(tmp_path / "format.csv")


def test_wheel_format_rules_on_files_written_here(tiny_wheels):
    """The loader's rules on the small files of conftest.py (runs without the benchmark's files)."""
    assert tiny_wheels.map_word_all("Happier ") == ("happy",) * 5  # a word form, lowercased and stripped
    assert tiny_wheels.map_word("excited", 1) == "happy"  # level 3, under level-1 and level-2 cells left blank
    assert tiny_wheels.map_word("relieved", 3) == "happy"  # a second level-2 branch, its level-1 cell blank
    assert tiny_wheels.map_word("glad", 2) == "happy" and tiny_wheels.map_word("unhappy", 4) == "sad"  # synonyms
    assert [tiny_wheels.map_word("surprise", k) for k in range(1, 6)] == ["surprise"] * 4 + [None]
    assert [tiny_wheels.map_word("disgusted", k) for k in range(1, 6)] == ["disgust", "disgust", None, "disgust", None]
    assert tiny_wheels.normalise(["neutral", "joy", "mad"], 1) == frozenset({"happy"})  # mad: not a word form
