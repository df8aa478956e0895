"""``kapao download coco|crowdpose DIR``: the built-in datasets fetched into the layout their YAMLs expect
(what ``scripts/get_coco.sh`` / ``get_crowdpose.sh`` do in a source checkout, for wheel users too).

COCO 2017 keypoints (train2017 19 GB, val2017 1 GB, annotations): ``DIR/images/{train,val}2017``,
``DIR/annotations/person_keypoints_*.json``. CrowdPose (images, trainval and test annotations, the files
the official KAPAO uses): ``DIR/images``, ``DIR/crowdpose_*.json``.

Each file is streamed with a progress bar into a temporary ``.part`` file beside its destination and moved
into place only when complete (its Content-Length checked); zips are then unpacked (no entry may leave
the target folder) and deleted. A file or folder already in place is skipped, so an interrupted download
runs again from the first missing piece. ``$KAPAO_DATASETS_URL`` (a template with ``{name}``, the file
name) replaces every source URL: a mirror, or a local test server.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from kapao.errors import DataError
from kapao.runtime import atomic_write

URL_ENV = "KAPAO_DATASETS_URL"
_TIMEOUT = 60.0  # seconds without data before a download is given up
_CHUNK = 1 << 20
_DRIVE = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset: its URL, its name, where it goes (relative to DIR), and whether it is a zip
    unpacked into ``dest`` (then ``done`` is what the zip leaves behind)."""

    url: str
    name: str
    dest: str
    done: str
    unzip: bool = False


DATASETS: dict[str, tuple[DatasetFile, ...]] = {
    "coco": (
        DatasetFile("http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                    "annotations_trainval2017.zip", ".", "annotations/person_keypoints_val2017.json", unzip=True),
        DatasetFile("http://images.cocodataset.org/zips/val2017.zip", "val2017.zip", "images", "images/val2017",
                    unzip=True),
        DatasetFile("http://images.cocodataset.org/zips/train2017.zip", "train2017.zip", "images", "images/train2017",
                    unzip=True),
    ),
    "crowdpose": (
        DatasetFile(_DRIVE.format(id="1VprytECcLtU4tKP32SYi_7oDRbw7yUTL"), "images.zip", ".", "images", unzip=True),
        DatasetFile(_DRIVE.format(id="13xScmTWqO6Y6m_CjiQ-23ptgX9sC-J9I"), "crowdpose_trainval.json",
                    "crowdpose_trainval.json", "crowdpose_trainval.json"),
        DatasetFile(_DRIVE.format(id="1FUzRj-dPbL1OyBwcIX2BgFPEaY5Yrz7S"), "crowdpose_test.json",
                    "crowdpose_test.json", "crowdpose_test.json"),
    ),
}


def file_url(f: DatasetFile) -> str:
    """The URL `f` is fetched from: $KAPAO_DATASETS_URL with {name} filled in, else its own."""
    template = os.environ.get(URL_ENV)
    return template.replace("{name}", f.name) if template else f.url


def download_dataset(name: str, folder: str | os.PathLike) -> list[Path]:
    """Fetch the built-in dataset `name` (coco, crowdpose) into `folder`; returns what was fetched now
    (skipped pieces already in place are not listed). DataError in one line for any failure."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    root = Path(folder)
    fetched = []
    for f in DATASETS[name]:
        if (root / f.done).exists():
            continue
        target = root / (f.dest if not f.unzip else f"{f.dest}/{f.name}")
        _fetch(file_url(f), target)
        if f.unzip:
            _unzip(target, root / f.dest)
            target.unlink()
        fetched.append(root / f.done)
    return fetched


def _fetch(url: str, out: Path) -> None:
    """Stream `url` into `out` atomically (a broken or short download leaves nothing behind)."""
    request = urllib.request.Request(url, headers={"User-Agent": "kapao-datasets/1 (python urllib)"})
    try:
        resp = urllib.request.urlopen(request, timeout=_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise DataError(f"could not download {url} (HTTP {e.code} {e.reason}); try again later or set {URL_ENV} "
                        "to a mirror") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"could not download {url} ({getattr(e, 'reason', None) or e}; offline?); try again "
                        f"when online, or set {URL_ENV} to a mirror") from None
    length = resp.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    got = 0
    try:
        with resp, atomic_write(out, suffix=".part") as f, \
                tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=out.name) as bar:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
            if total is not None and got != total:
                raise DataError(f"download of {url} is truncated ({got} of {total} bytes); run the command again")
    except OSError as e:
        raise DataError(f"download of {url} into {out} failed after {got} bytes ({e.strerror or e}); free disk "
                        "space and run the command again") from None


def _unzip(path: Path, into: Path) -> None:
    """Unpack `path` into `into`; an entry that would land outside it refuses the whole archive."""
    base = into.resolve()
    try:
        with zipfile.ZipFile(path) as z:
            for entry in z.namelist():
                if not (base / entry).resolve().is_relative_to(base):
                    raise DataError(f"{path}: entry {entry!r} points outside {into}; the archive was not unpacked")
            for entry in tqdm(z.infolist(), desc=f"unzip {path.name}", unit="file", leave=False):
                z.extract(entry, into)
    except zipfile.BadZipFile:
        path.unlink(missing_ok=True)
        raise DataError(f"{path} is not a readable zip archive (it was deleted); run the command again") from None
