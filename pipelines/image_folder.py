"""The ImageFolder layout every pipeline, the converter and the evaluations read (no torch needed).

SRC/<class>/<image>: labels are the indices of the sorted class directories.
"""
from __future__ import annotations

import os
import stat
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence, overload

import numpy as np

from bt_fast.errors import DataError, some_of

# torchvision's ImageFolder's (`torchvision.datasets.folder.IMG_EXTENSIONS`), so both read the same images
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def find_image_folder(root: str | Path) -> tuple[list[str], "SampleList"]:
    """Classes (sorted sub-directories) and (path, label) samples of an ImageFolder.

    A class's images are the files (and symbolic links) with an image suffix anywhere below its
    directory, not following linked directories, in `sorted(Path.rglob('*'))` order. Files beside the
    class directories are left aside. Raises DataError with the directory named if it is missing or
    holds no images, and with the entry and the reason named if a directory cannot be read or an
    entry beside the classes is neither a directory nor a file (`_is_class`): its images would
    otherwise be dropped without a word. The samples are a `SampleList`, built one class at a time:
    no list of every path is ever held.
    """
    root = image_folder_root(root)
    classes = _classes(root)
    samples = SampleList((path, label) for label, name in enumerate(classes) for path in _images_below(str(root / name)))
    if not samples:
        raise no_images(root)
    return classes, samples


def class_names(root: str | Path) -> list[str]:
    """The classes of the ImageFolder `root` (sorted), from a listing of `root` alone, not of its classes (the
    launcher's check must not list ImageNet); the DataErrors of `find_image_folder` for `root` itself."""
    return _classes(image_folder_root(root))


def check_known_classes(root: str | Path, own: Sequence[str], classes: Sequence[str]) -> None:
    """A DataError if the ImageFolder `root`, of classes `own`, has one that the training folder's `classes` lack:
    a validation folder is labelled like its training folder."""
    unknown = sorted(set(own) - set(classes))
    if unknown:
        raise DataError(f"{root} has classes not in the training folder: {some_of(unknown)}; "
                        f"train and val must use the same class sub-directories")


def count_images(root: str | Path, enough: int) -> int:
    """How many images `find_image_folder` lists in `root`, counted class by class until `enough` are found:
    the rest of the folder (most of ImageNet) is not listed. The same DataErrors as `find_image_folder`."""
    root = image_folder_root(root)
    found = 0
    for name in _classes(root):
        found += len(_images_below(str(root / name)))
        if found >= enough:
            return found
    if not found:
        raise no_images(root)
    return found


def _classes(root: Path) -> list[str]:
    """The class directories of the ImageFolder `root`, sorted."""
    try:
        with os.scandir(root) as entries:
            return sorted(entry.name for entry in entries if not entry.name.startswith(".") and _is_class(entry))
    except OSError as err:
        raise _unreadable(str(root), err) from None


def no_images(root: Path) -> DataError:
    return DataError(f"data directory {root} holds no images in class sub-directories (expected "
                     f"{root}/<class>/<image>.jpg)")


def classes_without_images(classes: Sequence[str], samples: "SampleList") -> list[str]:
    """The names in `classes` (indexed by label) that no sample of `samples` has: empty class folders."""
    counts = np.bincount(samples.labels, minlength=len(classes))
    return [name for name, count in zip(classes, counts) if not count]


def is_split_root(root: str | Path) -> bool:
    """Whether `root` holds train/ and val/ folders: a split dataset's root (what tools.evaluate takes), whose
    two splits an ImageFolder reader would take as two classes, the validation images among them."""
    return (Path(root) / "train").is_dir() and (Path(root) / "val").is_dir()


def image_folder_root(root: str | Path) -> Path:
    """`root` as a Path if it is a directory; DataError naming it otherwise (a file, or nothing there)."""
    root = Path(root)
    if root.is_file():
        raise DataError(f"data {root} is a file; give the ImageFolder directory (or, with pipeline=ffcv, a .beton)")
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; give an existing ImageFolder (a directory of class folders)")
    return root


def _is_class(entry: os.DirEntry) -> bool:
    """Whether `entry` of an ImageFolder's root is a class: a directory or a link to one. False for a file
    or a link to one; DataError naming it for anything else (a broken link, a socket, a named pipe, a
    device), for an entry whose type cannot be read (a link loop), and for a link to the root or a folder above
    it, whose class would hold every image again."""
    try:
        if entry.is_dir():
            target = os.path.realpath(entry.path) if entry.is_symlink() else None
            if target and Path(entry.path).parent.resolve().is_relative_to(target):
                raise DataError(f"class folder {entry.path} links to {target}, which holds the data directory itself: "
                                f"every image would be read again as this class; remove the link")
            return True
        if entry.is_file():
            return False
        if entry.is_symlink() and not os.path.exists(entry.path):
            raise DataError(f"class folder {entry.path} is a broken symbolic link (to {os.readlink(entry.path)}); "
                            f"restore its target or remove the link")
        kind = _KINDS.get(stat.S_IFMT(entry.stat().st_mode), "neither a directory nor a file")
    except OSError as err:
        raise _unreadable(entry.path, err) from None
    raise DataError(f"{entry.path} is {kind}, not a class folder; remove it or move it out of the data directory")


_KINDS = {stat.S_IFSOCK: "a socket", stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


def _unreadable(path: str, err: OSError) -> DataError:
    """The error for a directory (or entry) of an ImageFolder that `err` kept from being read."""
    return DataError(f"cannot read {path} ({err.strerror or err}); make it readable or move it out of the data "
                     f"directory")


def _has_image_suffix(name: str) -> bool:
    """`Path(name).suffix in IMAGE_SUFFIXES` for a lower-case name (a leading dot starts no suffix)."""
    return name.endswith(IMAGE_SUFFIXES) and name.rfind(".") > 0


def _images_below(directory: str) -> list[str]:
    """Image paths below `directory`, ordered as sorted Paths (by their parts); one scandir per
    directory and no stat per file, which is what keeps a million-image scan to seconds. A directory
    that cannot be read is a DataError naming it and the reason (where Path.rglob skips it)."""
    found: list[tuple[tuple[str, ...], str]] = []
    pending = [(directory, ())]
    while pending:
        current, parts = pending.pop()
        try:
            entries = os.scandir(current)
        except OSError as err:
            raise _unreadable(current, err) from None
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, parts + (entry.name,)))
                elif (_has_image_suffix(entry.name.lower())
                      and (entry.is_file() or entry.is_symlink())):
                    found.append((parts + (entry.name,), entry.path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


class SampleList(Sequence[tuple[str, int]]):
    """(path, label) samples held in three numpy arrays instead of a list of Python tuples: what
    `find_image_folder` returns; equal to a list of the same tuples.

    A read of a Python object writes its reference count, so a DataLoader worker (a forked copy of
    the process) that reads every sample of a list in an epoch copies every page the list's objects
    sit on: each worker comes to hold its own copy of the listing, about 250 MB for ImageNet's
    1.28 M paths (docs/performance.md; pytorch/pytorch#13246). Reading numpy arrays writes nothing. Paths are kept as UTF-8 (undecodable bytes as surrogate escapes, as `os` gives them).
    """

    _CHUNK = 1 << 12  # samples encoded at a time: the Python objects of more never exist at once (their
    # memory, about 200 bytes a sample, stays with the process once freed)

    def __init__(self, samples: Iterable[tuple[str, int]]):
        data, ends, labels = bytearray(), [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        remaining = iter(samples)
        while batch := list(islice(remaining, self._CHUNK)):
            encoded = [path.encode("utf-8", "surrogateescape") for path, _ in batch]
            ends.append(len(data) + np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded))))
            data += b"".join(encoded)
            labels.append(np.fromiter((label for _, label in batch), np.int64, len(batch)))
        self._bytes = np.frombuffer(data, dtype=np.uint8)
        self._ends = np.concatenate(ends)
        self._labels = np.concatenate(labels)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(mine == theirs for mine, theirs in zip(self, other))

    __hash__ = None  # equal to lists, which are unhashable

    def __len__(self) -> int:
        return len(self._labels)

    @overload
    def __getitem__(self, index: int) -> tuple[str, int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, int]]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        path = self._bytes[start:int(self._ends[index])].tobytes().decode("utf-8", "surrogateescape")
        return path, int(self._labels[index])

    @property
    def labels(self) -> np.ndarray:
        """Every sample's label, in order (int64; read-only)."""
        labels = self._labels.view()
        labels.flags.writeable = False
        return labels

    def paths(self, indices: np.ndarray) -> list[str]:
        """The paths of the samples `indices` (non-negative), in that order: a DALI epoch's file list."""
        indices = np.asarray(indices, dtype=np.int64)
        ends = self._ends[indices]
        starts = np.where(indices > 0, self._ends[indices - 1], 0)
        data = memoryview(self._bytes)
        return [str(data[start:end], "utf-8", "surrogateescape") for start, end in zip(starts.tolist(), ends.tolist())]

    def first_not_utf8(self) -> int | None:
        """The index of the first sample whose path is not valid UTF-8 (its undecodable bytes held as
        surrogate escapes), or None when every path is. One decode of the whole listing."""
        try:
            str(memoryview(self._bytes), "utf-8")
        except UnicodeDecodeError as err:
            return int(np.searchsorted(self._ends, err.start, side="right"))
        return None

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[i] for i in range(len(self)))
