"""Download the seven MER-UniBench emotion-wheel files from the AffectGPT repository.

They are Apache-2.0 files of https://github.com/zeroQiaoba/AffectGPT (`AffectGPT/emotion_wheel/`);
this package does not ship them. Each file is written atomically (temporary file, then rename) and
checked against the git blob hash of the version the published scores were computed with.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from opsd_jax.eval.wheels import WHEEL_DIRECTORY_FILES

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/zeroQiaoba/AffectGPT/master/AffectGPT/emotion_wheel"

# git blob SHA-1 (`git hash-object`) of each file in AffectGPT (2025 code, also identical in OV-MER).
EXPECTED_GIT_BLOBS: dict[str, str] = {
    "format.csv": "af5e062866017f24191b06d4b7ac71f8cf1342ca",
    "synonym.xlsx": "30ce6cc87796c509933440f3bbbb0603e93e3fe5",
    "wheel1.xlsx": "b617251564d89404a0e29143802be8530ba66d60",
    "wheel2.xlsx": "cdc4ca6f0fb22b636ef2400edec25afdc726dd5e",
    "wheel3.xlsx": "f4e7e5547c6403c82540bbe72e36a15ae53ac380",
    "wheel4.xlsx": "3f6db4b0972d73e5e1fa56fa18bc740ff9b8feda",
    "wheel5.xlsx": "419b9f36664c2711a23902c061f8af68c23833c8",
}


class FetchError(RuntimeError):
    """A download failed or returned something other than the expected file."""


def git_blob_sha1(data: bytes) -> str:
    """The hash `git hash-object` gives a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _download(url: str, timeout_s: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        raise FetchError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise FetchError(f"downloading {url} failed: {err.reason}") from None
    except TimeoutError:
        raise FetchError(f"downloading {url} failed: no answer within {timeout_s} s") from None


def _write_atomically(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def fetch_wheel_files(
    dest: str | Path, base_url: str = DEFAULT_BASE_URL, *, verify: bool = True, timeout_s: float = 60.0
) -> list[Path]:
    """Download format.csv, synonym.xlsx and wheel1..5.xlsx from `base_url` into `dest`.

    Every file is downloaded and checked before any is written, so a failure leaves `dest` as it was.
    With `verify`, a file whose git blob hash differs from the benchmark's version is an error.
    """
    dest = Path(dest)
    downloads: dict[str, bytes] = {}
    for name in WHEEL_DIRECTORY_FILES:
        url = f"{base_url.rstrip('/')}/{name}"
        data = _download(url, timeout_s)
        if verify and git_blob_sha1(data) != EXPECTED_GIT_BLOBS[name]:
            raise FetchError(
                f"{url}: git blob {git_blob_sha1(data)} ({len(data)} bytes) is not the benchmark's version "
                f"{EXPECTED_GIT_BLOBS[name]}; scores computed with it would not match the published ones "
                "(use --no-verify to accept it anyway)"
            )
        downloads[name] = data
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in downloads.items():
        _write_atomically(dest / name, data)
        written.append(dest / name)
    return written
