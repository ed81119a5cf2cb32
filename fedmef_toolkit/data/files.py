"""Uniform access to the files of a data set given as a directory or an archive.

`iter_files(root)` yields (relative posix path, bytes) for every regular file
in a directory tree or a .tar/.tar.gz/.tgz/.tar.xz/.zip archive, streaming
archives in one pass (xz archives cannot seek cheaply).
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..errors import UserError, brief

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".zip")


def _safe_member(name: str, root: Path) -> str:
    """An archive member's relative path; a member that climbs out ('..') or is absolute is
    refused: the archive is hostile or broken (nothing is ever extracted to disk either way)."""
    rel = name[2:] if name.startswith("./") else name
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if rel.startswith(("/", "\\")) or ".." in parts:
        raise UserError(f"archive member {brief(repr(name), 120)} has an absolute path or '..'; refusing the archive",
                        str(root))
    return rel


def iter_files(root: Path, wanted=lambda rel: True) -> Iterator[tuple[str, bytes]]:
    """Yield (relative path, content) for files whose relative path passes `wanted`."""
    if not root.exists():
        raise UserError("data set path not found", str(root))
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and wanted(rel):
                yield rel, path.read_bytes()
        return
    name = root.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(root) as zf:
                for info in zf.infolist():
                    rel = _safe_member(info.filename, root)
                    if not info.is_dir() and wanted(rel):
                        yield rel, zf.read(info)
            return
        if name.endswith(ARCHIVE_SUFFIXES):
            with tarfile.open(root, "r:*") as tf:
                for member in tf:
                    rel = _safe_member(member.name, root)
                    if member.isfile() and wanted(rel):
                        handle = tf.extractfile(member)
                        if handle is not None:
                            yield rel, handle.read()
            return
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UserError(f"cannot read archive: {exc}", str(root)) from None
    raise UserError(f"not a directory or a supported archive ({', '.join(ARCHIVE_SUFFIXES)})", str(root))
