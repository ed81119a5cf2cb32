"""Every file the toolkit writes goes through here: atomic replacement, appends, content
hashes, one-line I/O errors and the fault-injection hook.

- `save_safetensors(path, tensors, metadata)`: a safetensors file with a content hash
  (`fedmef_sha256` in its metadata), written to `<name>.<pid>-<random>.tmp`, flushed, renamed over `path`
  (and the directory entry flushed): a kill leaves the old file or the new one, never a part.
- `write_text_atomic(path, text)`: the same for text files.
- `append_line(handle, path, line)`: one JSON line appended and flushed (metrics.jsonl is only
  ever appended; `truncate_to(path, size)` cuts an uncommitted tail on resume).
- `read_safetensors_verified(path)`: tensors and metadata, with the content hash checked.
- Any OSError (full disk, read-only file system, permissions, missing parent) becomes a
  `StorageError`: one line naming the path, exit code 1; a failed replacement removes its
  `.tmp` file and leaves the previous file as it was.

Fault injection (tests): `FEDMEF_FAULT="<point>,<n>[,<action>]"` makes the n-th write point
of this process whose name matches `<point>` (an fnmatch pattern) `kill` the process with
SIGKILL (the default) or fail with `enospc`, `erofs` or `eacces`. Points are named
`<stage>:<file name>` with stages `partial` (half of the bytes written), `written` (the
temporary file complete and flushed, before the rename), `replaced` (after the rename),
`truncate` (before cutting a tail) and `appended` (after a metrics line). `set_fault_hook`
installs a Python callable instead (in-process tests).
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import secrets
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import UserError, brief

if TYPE_CHECKING:
    import torch

HASH_KEY = "fedmef_sha256"
MAX_PATH_BYTES = 4000  # below PATH_MAX (4096), leaving room for the files inside a run directory
MAX_NAME_BYTES = 200  # below NAME_MAX (255), leaving room for suffixes (-2, .tmp)


class StorageError(UserError):
    """Writing or reading a file failed (full disk, read-only, permissions...): exit code 1."""

    exit_code = 1


def io_error(exc: OSError, path: Path | str, doing: str = "cannot write") -> StorageError:
    """A one-line StorageError naming the path from any OSError."""
    what = exc.strerror or brief(exc)
    return StorageError(f"{doing}: {what}", str(getattr(exc, "filename", None) or path))


# -- fault injection ----------------------------------------------------------------------

_fault_hook: Callable[[str, Path], None] | None = None
_fault_counts: dict[str, int] = {}
_ACTIONS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eacces": errno.EACCES}


def set_fault_hook(hook: Callable[[str, Path], None] | None) -> None:
    """Install `hook(point, path)`, called at every write point (None removes it)."""
    global _fault_hook
    _fault_hook = hook


def faults_active() -> bool:
    return _fault_hook is not None or bool(os.environ.get("FEDMEF_FAULT"))


def fault_point(stage: str, path: Path) -> None:
    """A place where a test may kill the process or make the write fail."""
    point = f"{stage}:{path.name}"
    if _fault_hook is not None:
        _fault_hook(point, path)
    spec = os.environ.get("FEDMEF_FAULT")
    if not spec:
        return
    parts = spec.split(",")
    pattern, n = parts[0], int(parts[1]) if len(parts) > 1 else 1
    action = parts[2] if len(parts) > 2 else "kill"
    if not fnmatch.fnmatchcase(point, pattern):
        return
    _fault_counts[spec] = _fault_counts.get(spec, 0) + 1
    if _fault_counts[spec] != n:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = _ACTIONS.get(action, errno.EIO)
    raise OSError(code, os.strerror(code), str(path))


# -- content hash -------------------------------------------------------------------------


def _raw_bytes(t: "torch.Tensor"):
    import torch

    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def content_hash(tensors: "dict[str, torch.Tensor]", metadata: dict[str, str]) -> str:
    """SHA-256 over the metadata (but the hash itself) and every tensor's name, dtype, shape
    and bytes: any change of a stored value, shape or metadata entry changes it."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != HASH_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(_raw_bytes(t))
    return h.hexdigest()


def verify_hash(tensors: "dict[str, torch.Tensor]", metadata: dict[str, str], source: str) -> bool:
    """True when the file carries a hash and it matches; False when it carries none (files
    written before hashes existed are accepted); a UserError when it does not match."""
    stored = metadata.get(HASH_KEY)
    if stored is None:
        return False
    if content_hash(tensors, metadata) != stored:
        raise UserError("content hash mismatch: the file was damaged or altered after it was written "
                        f"({HASH_KEY} in its metadata does not match its contents)", source)
    return True


# -- writing ------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _write_fd(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def replace_bytes(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data` (fault points: partial, written, replaced)."""
    path = Path(path)
    # a name of its own: two processes replacing one file never write into each other's temp file
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            half = len(data) // 2
            _write_fd(fd, memoryview(data)[:half])
            fault_point("partial", path)
            _write_fd(fd, memoryview(data)[half:])
            os.fsync(fd)
        finally:
            os.close(fd)
        fault_point("written", path)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise io_error(exc, path) from None
    _fsync_dir(path.parent)
    fault_point("replaced", path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a text file so that a kill leaves the old content or the new, never a part."""
    replace_bytes(Path(path), text.encode())


def save_safetensors(path: Path, tensors: "dict[str, torch.Tensor]", metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file whose metadata carries its content hash."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items() if k != HASH_KEY}
    meta[HASH_KEY] = content_hash(tensors, meta)
    replace_bytes(Path(path), save(tensors, metadata=meta))


def open_append(path: Path):
    """`path` opened for appending, unbuffered and binary (for `append_line`): nothing waits in a
    buffer, so a failed write (full disk) leaves nothing for close() to fail on again."""
    try:
        return open(path, "ab", buffering=0)
    except OSError as exc:
        raise io_error(exc, path) from None


def append_line(handle, path: Path, line: str) -> None:
    """Append one line to a handle from `open_append`; a kill mid-line leaves a torn last
    line, which readers (resume) drop. Fault points: partial, appended."""
    data = (line + "\n").encode("utf-8")
    try:
        if faults_active():  # a torn line on demand; otherwise one write, so Ctrl-C tears nothing
            half = len(data) // 2
            _write_fd(handle.fileno(), data[:half])
            fault_point("partial", path)
            data = data[half:]
        _write_fd(handle.fileno(), data)
    except OSError as exc:
        raise io_error(exc, path) from None
    fault_point("appended", path)


def lock_run_dir(run_dir: Path, name: str = ".lock"):
    """Hold an advisory lock on a run directory (its file `name`, `rundir.LOCK`) for as long as
    the returned handle is open: a second `fedmef train --resume` of the same run is refused
    instead of interleaving."""
    path = Path(run_dir) / name
    try:
        handle = open(path, "a")
    except OSError as exc:
        raise io_error(exc, path) from None
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError("the run is in use by another fedmef process", str(run_dir)) from None
    return handle


def truncate_to(path: Path, size: int) -> None:
    """Cut a file to `size` bytes (one system call: a kill leaves the old length or the new)."""
    fault_point("truncate", path)
    try:
        os.truncate(path, size)
    except OSError as exc:
        raise io_error(exc, path) from None


# -- reading ------------------------------------------------------------------------------


def read_safetensors_verified(path: Path) -> "tuple[dict[str, torch.Tensor], dict[str, str], bool]":
    """(tensors, metadata, hash checked) of a safetensors file, in one open; a damaged file,
    or one whose content hash does not match, is a one-line UserError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError("file not found", str(path))
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as exc:
        raise io_error(exc, path, "cannot read") from None
    except Exception as exc:  # safetensors raises several types for damaged files
        raise UserError(f"not a valid safetensors file ({brief(exc, 200)})", str(path)) from None
    return tensors, meta, verify_hash(tensors, meta, str(path))


# -- output locations ---------------------------------------------------------------------


def check_path_text(text: str, where: str, name_only: bool = False) -> str | None:
    """Why a recipe's path or file name cannot be used (None when it can)."""
    if "\x00" in text:
        return f"{where}: contains a NUL byte"
    try:
        size = len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a lone surrogate that no file system name can hold
        return f"{where}: not valid UTF-8 text"
    if size > (MAX_NAME_BYTES if name_only else MAX_PATH_BYTES):
        return f"{where}: too long ({size} bytes; at most {MAX_NAME_BYTES if name_only else MAX_PATH_BYTES})"
    if name_only and (not text or "/" in text or "\\" in text or text in (".", "..")):
        return f"{where}: must be a plain name (no '/', not '.' or '..'), got {text!r}"
    if not name_only and any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in text.split("/")):
        return f"{where}: a path component is longer than 255 bytes"
    return None


def new_run_dir(parent: Path, name: str | None, default_base: str) -> Path:
    """Create a run directory under `parent`: `name`, or `default_base` with `-2`, `-3`...
    when runs start in the same second. A new run never writes into an existing directory
    (an existing `name` is refused) and mkdir is atomic, so concurrent runs cannot share one."""
    for what, text in (("output.dir", str(parent)), ("output.name", name or default_base)):
        problem = check_path_text(text, what, name_only=what == "output.name")
        if problem:
            raise UserError(problem)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if name:
            run_dir = parent / name
            try:
                run_dir.mkdir()
            except FileExistsError:
                raise UserError("run directory already exists; continue it with `fedmef train --resume "
                                f"{run_dir}` or pick another output.name", str(run_dir)) from None
            return run_dir
        for i in range(1, 1000):
            run_dir = parent / (default_base if i == 1 else f"{default_base}-{i}")
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                continue
    except OSError as exc:
        raise io_error(exc, parent, "cannot create the run directory") from None
    raise UserError("too many runs with the same name in this second", str(parent))


def check_output_file(path: Path) -> None:
    """Before an export or conversion: the output's folder exists (or can be made) and is a
    folder, and the output itself is not a folder (one-line StorageError otherwise)."""
    path = Path(path)
    problem = check_path_text(str(path), "output path")
    if problem:
        raise UserError(problem)
    if path.is_dir():
        raise StorageError("is a directory, not a file", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(exc, path.parent, "cannot create the output folder") from None
