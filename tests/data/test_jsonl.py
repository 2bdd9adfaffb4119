"""Crash-tolerant JSONL: complete lines are kept, a cut-short last line is dropped with a warning."""

from __future__ import annotations

import pytest

from opsd_jax.data.jsonl import complete_length, read_complete


def test_complete_length_stops_at_the_last_newline(tmp_path):
    assert complete_length(b'{"a": 1}\n{"b": 2}\n', "f.jsonl") == 18
    assert complete_length(b"", "f.jsonl") == 0
    with pytest.warns(UserWarning, match=r"f\.jsonl: dropping an incomplete last line"):
        assert complete_length(b'{"a": 1}\n{"b"', "f.jsonl") == 9


def test_read_complete_truncates_the_file_so_the_next_record_starts_clean(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": ')
    with pytest.warns(UserWarning, match="records.jsonl"):
        assert read_complete(path) == b'{"a": 1}\n'
    with path.open("ab") as handle:
        handle.write(b'{"c": 3}\n')
    assert path.read_bytes() == b'{"a": 1}\n{"c": 3}\n'
