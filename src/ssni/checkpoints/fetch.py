"""Download a public file: resumable, atomic, hash-checked where a hash is known.

``download(url, target)`` writes ``target.part`` and continues it with an HTTP
``Range`` request after an interruption; only a complete file whose hash
matches (sha256 or md5, when the registry knows one) is renamed to ``target``,
so a folder never holds a half-written checkpoint under its real name. A
wrong hash deletes the partial file and raises, naming both hashes.
"""

from __future__ import annotations

import hashlib
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import CheckpointError
from ..folders import check_folder
from ..progress import tqdm

CHUNK = 1 << 20
CIFAR10_DATA = {"url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "file": "cifar-10-python.tar.gz", "md5": "c58f30108f718f92721af3b95e74349a",
                "folder": "cifar-10-batches-py", "license": "CIFAR-10 terms (Krizhevsky, 2009)"}


def download(url: str, target: Path, *, sha256: str | None = None, md5: str | None = None,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``target`` (resuming ``target.part``), check its hash, rename atomically."""
    target = Path(target)
    if target.is_file() and _hash_ok(target, sha256, md5):
        return target
    check_folder(target.parent)  # one InputError for a folder that cannot be made or written
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if have and response.status != 206:  # the server ignored the range: start again
                have = 0
            total = have + int(response.headers.get("Content-Length", 0)) or None
            with open(part, "ab" if have else "wb") as sink, tqdm(total=total, initial=have, unit="B",
                                                                   unit_scale=True, desc=target.name,
                                                                   disable=not progress) as bar:
                while chunk := response.read(CHUNK):
                    sink.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        if err.code != 416:  # 416: the range starts at the end, the part file is already whole
            raise CheckpointError(f"download of {url} failed ({err}); check the URL or try again later") from err
        total = None
    except (urllib.error.URLError, OSError) as err:
        raise CheckpointError(f"download of {url} stopped ({err}); run the same command again to resume "
                              f"({part} keeps what arrived)") from err
    if total is not None and part.stat().st_size < total:
        raise CheckpointError(f"download of {url} stopped at {part.stat().st_size} of {total} bytes; "
                              "run the same command again to resume")
    if not _hash_ok(part, sha256, md5):
        found = _digest(part, "sha256" if sha256 else "md5")
        part.unlink()
        raise CheckpointError(f"{url} has {'sha256' if sha256 else 'md5'} {found}, expected {sha256 or md5}; "
                              "the partial file was deleted (a changed or corrupted source)")
    part.replace(target)
    return target


def fetch_public(name: str, weights_dir: Path, progress: bool = True) -> Path:
    """Download the public checkpoint ``name`` into ``weights_dir`` (see :data:`ssni.checkpoints.public.PUBLIC`)."""
    from .public import PUBLIC

    if name not in PUBLIC:
        shipped = shipped_file(name)
        if shipped is not None:
            raise CheckpointError(f"{name} is shipped with the package ({shipped}): nothing to download")
        raise CheckpointError(f"unknown model {name!r}; fetchable: {sorted(n for n, e in PUBLIC.items() if e.download)}"
                              " and cifar10-data")
    entry = PUBLIC[name]
    if entry.download is None:
        raise CheckpointError(f"{name} has no direct download; get {entry.file} from {entry.url} into {weights_dir}")
    target = Path(weights_dir) / entry.download.rsplit("/", 1)[-1]
    return download(entry.download, target, sha256=entry.sha256, progress=progress)


def shipped_file(name: str) -> Path | None:
    """The weight file of ``name`` if it is shipped with the package (the default weights folder)."""
    from .registry import default_weights_dir, load_manifest

    entry = load_manifest(default_weights_dir()).get(name)
    return None if entry is None else default_weights_dir() / entry["file"]


def fetch_cifar10(dest: Path, progress: bool = True, url: str | None = None) -> Path:
    """The CIFAR-10 python batches into ``dest/cifar-10-batches-py`` (the folder ``data.root`` names)."""
    archive = download(url or CIFAR10_DATA["url"], Path(dest) / CIFAR10_DATA["file"], md5=CIFAR10_DATA["md5"],
                       progress=progress)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")  # refuses absolute paths, '..' and links out of dest
    return Path(dest) / CIFAR10_DATA["folder"]


def _digest(path: Path, kind: str) -> str:
    h = hashlib.new(kind)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_ok(path: Path, sha256: str | None, md5: str | None) -> bool:
    if sha256:
        return _digest(path, "sha256") == sha256
    return _digest(path, "md5") == md5 if md5 else True
