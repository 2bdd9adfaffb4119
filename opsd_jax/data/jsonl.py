"""Append-only JSONL files that survive a crash (rationales, predictions, the extractor's response cache).

Records are appended one line at a time, so an interrupted write can leave only the last line cut short.
Readers keep the complete lines and drop that one (its record is made again on resume), with a warning
that names the file. `decode_utf8` reads the text files users write by hand (manifests, configs).
"""

from __future__ import annotations

import warnings
from pathlib import Path


def complete_length(data: bytes, path: str | Path) -> int:
    """How many bytes of `data` (the contents of `path`) end with its last newline; warns when a cut-short
    last line follows them."""
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        warnings.warn(f"{path}: dropping an incomplete last line (an interrupted write)", stacklevel=3)
    return complete


def read_complete(path: str | Path) -> bytes:
    """The complete lines of `path`; a cut-short last line is also truncated away from the file itself, so
    that the next appended record starts on a line of its own."""
    path = Path(path)
    data = path.read_bytes()
    complete = complete_length(data, path)
    if complete < len(data):
        with path.open("r+b") as handle:
            handle.truncate(complete)
    return data[:complete]


def decode_utf8(data: bytes, path: str | Path, error: type[Exception] = ValueError) -> str:
    """`data` (the contents of `path`) as UTF-8 text, a leading byte-order mark dropped; bytes that are not
    UTF-8 raise `error` naming the file, the line and the offending byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "save the file as UTF-8"
        ) from None
