"""fetch-wheels from a local HTTP server on 127.0.0.1 that serves the shared benchmark directory."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from opsd_jax.cli import main
from opsd_jax.eval.fetch import EXPECTED_GIT_BLOBS, FetchError, fetch_wheel_files, git_blob_sha1
from opsd_jax.eval.wheels import WHEEL_DIRECTORY_FILES, load_emotion_wheels


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class StaticServer:
    """Serves `directory` read-only at http://127.0.0.1:<port>/; counts requests."""

    def __init__(self, directory: Path):
        self.paths: list[str] = []
        paths = self.paths

        class Handler(_QuietHandler):
            def do_GET(self):
                paths.append(self.path)
                super().do_GET()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._server.shutdown()
        self._server.server_close()


def test_expected_hashes_cover_exactly_the_seven_files():
    assert set(EXPECTED_GIT_BLOBS) == set(WHEEL_DIRECTORY_FILES)
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob


def test_fetch_downloads_verifies_and_writes_every_file(tmp_path, wheel_dir):
    dest = tmp_path / "wheels"
    with StaticServer(wheel_dir.parent) as server:
        written = fetch_wheel_files(dest, server.url + "/emotion_wheel", timeout_s=5)
    assert sorted(path.name for path in written) == sorted(WHEEL_DIRECTORY_FILES)
    assert len(server.paths) == 7
    for name in WHEEL_DIRECTORY_FILES:
        assert (dest / name).read_bytes() == (wheel_dir / name).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(WHEEL_DIRECTORY_FILES)  # no temporary files left
    assert load_emotion_wheels(dest).map_word("fear", 2) == "happy"


def test_http_failure_names_the_url_and_writes_nothing(tmp_path):
    (tmp_path / "served").mkdir()
    dest = tmp_path / "wheels"
    with StaticServer(tmp_path / "served") as server:
        with pytest.raises(FetchError, match=r"downloading http://127\.0\.0\.1:\d+/format\.csv failed: HTTP 404"):
            fetch_wheel_files(dest, server.url, timeout_s=5)
    assert not dest.exists()


def test_a_different_file_is_refused_unless_verification_is_off(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for name in WHEEL_DIRECTORY_FILES:
        (served / name).write_bytes(b"not the benchmark's " + name.encode())
    with StaticServer(served) as server:
        with pytest.raises(FetchError, match="format.csv: git blob .* is not the benchmark's version"):
            fetch_wheel_files(tmp_path / "checked", server.url, timeout_s=5)
        assert not (tmp_path / "checked").exists()
        fetch_wheel_files(tmp_path / "unchecked", server.url, verify=False, timeout_s=5)
    assert (tmp_path / "unchecked" / "wheel3.xlsx").read_bytes() == b"not the benchmark's wheel3.xlsx"


def test_cli_fetch_wheels(tmp_path, wheel_dir, capsys):
    with StaticServer(wheel_dir) as server:
        assert main(["eval", "fetch-wheels", "--dest", str(tmp_path), "--base-url", server.url, "--timeout", "5"]) == 0
        assert len(capsys.readouterr().out.split()) == 7
        assert (
            main(
                [
                    "eval",
                    "fetch-wheels",
                    "--dest",
                    str(tmp_path / "x"),
                    "--base-url",
                    server.url + "/nope",
                    "--timeout",
                    "5",
                ]
            )
            == 2
        )
    assert "HTTP 404" in capsys.readouterr().err
