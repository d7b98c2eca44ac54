"""The download helper, against a local HTTP server on 127.0.0.1 and unreachable URLs (never the internet)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import pytest

from pipeline.datasets import download_movielens, read_movielens
from pipeline.datasets.download import movielens_url
from pipeline.errors import DataError


@pytest.fixture(scope="module")
def served_zip(synthetic_raw, tmp_path_factory, zip_folder):
    """A real ml-1m-layout zip served over HTTP on 127.0.0.1: (url, md5)."""
    root = tmp_path_factory.mktemp("www")
    archive = zip_folder(synthetic_raw, root / "ml-1m.zip", "ml-1m")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ml-1m.zip", hashlib.md5(archive.read_bytes()).hexdigest()
    server.shutdown()
    server.server_close()


def test_official_urls():
    assert movielens_url("ml-1m") == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    assert movielens_url("ml-100k").endswith("/ml-100k.zip") and movielens_url("ml-25m").endswith("/ml-25m.zip")


def test_download_checks_md5_and_lands_a_readable_zip(served_zip, tmp_path, synthetic_raw):
    url, md5 = served_zip
    path = download_movielens("ml-1m", tmp_path / "raw", url=url, md5=md5)
    assert path == tmp_path / "raw" / "ml-1m.zip"
    assert len(read_movielens("ml-1m", path).ratings) == len(read_movielens("ml-1m", synthetic_raw).ratings)
    # A second call finds the verified zip and does not fetch again (a dead URL proves it).
    assert download_movielens("ml-1m", tmp_path / "raw", url="http://127.0.0.1:1/x.zip", md5=md5) == path


def test_checksum_mismatch_leaves_nothing(served_zip, tmp_path):
    url, _ = served_zip
    with pytest.raises(DataError, match=r"downloaded file has MD5 [0-9a-f]{32}, expected 0{32}; nothing was written"):
        download_movielens("ml-1m", tmp_path, url=url, md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_offline_error_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError) as err:
        download_movielens("ml-1m", tmp_path / "raw", url="http://127.0.0.1:1/ml-1m.zip", timeout=5)
    message = str(err.value)
    assert "cannot download ml-1m from http://127.0.0.1:1/ml-1m.zip" in message
    assert f"put the zip at {tmp_path / 'raw' / 'ml-1m.zip'}" in message
    assert f"ratings.dat, users.dat, movies.dat) in {tmp_path / 'raw' / 'ml-1m'}/" in message
    assert not (tmp_path / "raw" / "ml-1m.zip").exists()


def test_file_url_and_missing_file(synthetic_raw, tmp_path, zip_folder):
    archive = zip_folder(synthetic_raw, tmp_path / "ml-1m-src.zip", "ml-1m")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    path = download_movielens("ml-1m", tmp_path / "raw", url=archive.as_uri(), md5=md5)
    assert path.read_bytes() == archive.read_bytes()
    with pytest.raises(DataError, match="cannot download ml-100k"):
        download_movielens("ml-100k", tmp_path / "raw", url=(tmp_path / "absent.zip").as_uri())
