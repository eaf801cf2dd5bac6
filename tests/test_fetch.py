"""`ssni fetch` against a local HTTP server on 127.0.0.1 that the test starts (no other network)."""

import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ssni.checkpoints.fetch import download, fetch_cifar10
from ssni.errors import CheckpointError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Files(BaseHTTPRequestHandler):
    """Serves ``files[path]`` with Range support; ``drop[path]`` bytes are sent before the connection drops."""

    files: dict[str, bytes] = {}
    drop: dict[str, int] = {}
    ranges: list[str] = []

    def do_GET(self):
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        header = self.headers.get("Range")
        self.ranges.append(header or "")
        if header:
            start = int(header.split("=")[1].split("-")[0])
            if start >= len(data):  # as real servers answer a range past the end
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = self.drop.pop(self.path, None)
        self.wfile.write(data[start:cut] if cut is not None else data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Files.files, Files.drop, Files.ranges = {}, {}, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_the_hash_and_renames_atomically(server, tmp_path):
    Files.files["/w.bin"] = PAYLOAD
    path = download(f"{server}/w.bin", tmp_path / "w.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest(),
                    progress=False)
    assert path.read_bytes() == PAYLOAD and not (tmp_path / "w.bin.part").exists()


def test_a_dropped_connection_resumes_where_it_stopped(server, tmp_path):
    Files.files["/w.bin"], Files.drop["/w.bin"] = PAYLOAD, 300_000
    with pytest.raises(CheckpointError, match="run the same command again to resume"):
        download(f"{server}/w.bin", tmp_path / "w.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert not (tmp_path / "w.bin").exists() and (tmp_path / "w.bin.part").stat().st_size == 300_000
    download(f"{server}/w.bin", tmp_path / "w.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD
    assert Files.ranges[-1] == "bytes=300000-"  # only the rest was requested


def test_a_wrong_hash_deletes_the_partial_file_and_names_both_hashes(server, tmp_path):
    Files.files["/w.bin"] = PAYLOAD
    with pytest.raises(CheckpointError, match="expected 0000"):
        download(f"{server}/w.bin", tmp_path / "w.bin", sha256="0000", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_is_a_checkpoint_error(server, tmp_path):
    with pytest.raises(CheckpointError, match="404"):
        download(f"{server}/nothing", tmp_path / "x", progress=False)


def test_cifar10_archive_is_checked_and_unpacked(server, tmp_path, monkeypatch):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    archive = buffer.getvalue()
    Files.files["/c.tar.gz"] = archive
    import ssni.checkpoints.fetch as fetch_module

    monkeypatch.setitem(fetch_module.CIFAR10_DATA, "md5", hashlib.md5(archive).hexdigest())
    folder = fetch_cifar10(tmp_path, progress=False, url=f"{server}/c.tar.gz")
    assert (folder / "batches.meta").read_bytes() == b"hello"


def test_fetch_public_uses_the_registry_and_a_missing_file_names_the_command(server, tmp_path, monkeypatch):
    from dataclasses import replace

    from ssni.checkpoints import public
    from ssni.checkpoints.fetch import fetch_public

    entry = replace(public.PUBLIC["imagenet-resnet50"], download=f"{server}/resnet50-0676ba61.pth",
                    sha256=hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(public.PUBLIC, "imagenet-resnet50", entry)
    with pytest.raises(CheckpointError, match="ssni fetch imagenet-resnet50 --weights-dir"):
        public.public_path("imagenet-resnet50", tmp_path)
    Files.files["/resnet50-0676ba61.pth"] = PAYLOAD
    assert fetch_public("imagenet-resnet50", tmp_path, progress=False) == public.public_path("imagenet-resnet50",
                                                                                             tmp_path)
    with pytest.raises(CheckpointError, match="no direct download"):
        fetch_public("cifar10-wrn-70-16", tmp_path, progress=False)


def test_a_whole_part_file_left_by_a_crash_is_checked_and_renamed(server, tmp_path):
    Files.files["/w.bin"] = PAYLOAD
    (tmp_path / "w.bin.part").write_bytes(PAYLOAD)  # complete, but never renamed
    path = download(f"{server}/w.bin", tmp_path / "w.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert path.read_bytes() == PAYLOAD and not (tmp_path / "w.bin.part").exists()
