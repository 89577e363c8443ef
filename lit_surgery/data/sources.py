"""Where each dataset's files come from: a folder you name, a system folder (Debian's
``dataset-fashion-mnist``), the cache, or a download checked against the published MD5s.

The errors of the data side live here too, since every later step raises them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lit_surgery.errors import UserError

DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "svhn", "npz")


class DataError(UserError):
    """Bad data or data settings: a file that is malformed, fails its checksum or does not
    fit the expected layout; an unknown dataset; a split or batch size that cannot work."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The files are not there and could not be downloaded; the message says how to get them."""


# --------------------------------------------------------------------------------------
# Where each dataset's files come from


@dataclass(frozen=True)
class Source:
    """A dataset's files (name -> published MD5), base URLs to try in order, system dirs."""

    files: dict[str, str]
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()


SOURCES: dict[str, Source] = {
    "fashion_mnist": Source(
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        ("/usr/share/datasets/fashion-mnist",),  # Debian: apt install dataset-fashion-mnist
    ),
    "mnist": Source(
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    ),
    "cifar10": Source(
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        ("https://www.cs.toronto.edu/~kriz/",),
    ),
    "svhn": Source(
        {
            "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
            "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
        },
        ("http://ufldl.stanford.edu/housenumbers/",),
    ),
}


def default_data_dir(dataset: str) -> Path:
    """Where downloads go when no ``data_dir`` is given: the user's cache, not the work tree."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lit_surgery" / dataset


def _download(url: str, dest: Path, md5: str) -> None:
    """Fetch into a temporary file beside ``dest``; rename only once the MD5 matches.

    A failed, interrupted or corrupt download leaves nothing behind, so a later run never
    mistakes a partial file for the real one (and concurrent ranks cannot see half a file).
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"checksum mismatch: MD5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download_any(mirrors: tuple[str, ...], dest: Path, md5: str) -> list[str]:
    """Try each mirror in turn; the reasons they all failed, or [] once one succeeded."""
    failures = []
    for mirror in mirrors:
        try:
            _download(mirror + dest.name, dest, md5)
            return []
        except (OSError, DataError) as err:
            failures.append(f"{mirror + dest.name}: {err}")
    return failures


def fetch(dataset: str, data_dir: str | Path | None = None, *, download: bool = False) -> Path:
    """The directory holding all of ``dataset``'s files, downloading missing ones if allowed.

    Looks in ``data_dir`` (or :func:`default_data_dir`), then the source's system dirs;
    downloads into the first. Raises :class:`DataNotFoundError` with the files, the
    directories searched and the URLs when the files are neither there nor downloadable.
    """
    source = SOURCES[dataset]
    target = Path(data_dir) if data_dir is not None else default_data_dir(dataset)
    searched = [target, *map(Path, source.system_dirs)]
    for folder in searched:
        if all((folder / name).is_file() for name in source.files):
            return folder
    failures: list[str] = []
    if download:
        target.mkdir(parents=True, exist_ok=True)
        for name, md5 in source.files.items():
            if not (target / name).is_file():
                failures += _download_any(source.mirrors, target / name, md5)
        if not failures:
            return target
    missing = [name for name in source.files if not (target / name).is_file()]
    lines = [
        f"{dataset}: files not found: {', '.join(missing)}.",
        f"Searched: {', '.join(map(str, searched))}.",
        f"Put these files in {target} (as downloaded, not unpacked):",
        *(
            f"  {name}  from {source.mirrors[0] + name}  MD5 {source.files[name]}"
            for name in missing
        ),
    ]
    if source.system_dirs:
        lines.append(f"or install the Debian package that fills {source.system_dirs[0]}.")
    if failures:
        lines += ["Downloads failed:", *(f"  {f}" for f in failures)]
    else:
        lines.append("or pass download=True (SurgeryDataModule.prepare_data downloads).")
    raise DataNotFoundError("\n".join(lines))
