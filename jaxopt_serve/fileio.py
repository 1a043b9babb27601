"""Safe file reads and writes.

Writes go to a temporary file in the target's directory, are flushed, then
renamed over the target, so readers see the old file or the whole new one.
The temporary file is locked while it is written; a later save to the same
path removes the temporary files that no live writer holds (a save killed
before its rename leaves one behind).

Reads of model files accept regular files only (a FIFO, a device such as
``/dev/zero`` or a directory is refused before anything is read, so a bad
path never blocks or fills memory), and read exactly the bytes asked for.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

try:  # POSIX; elsewhere stale temporary files are left alone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

_TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    Temporary files of earlier saves to ``path`` that were killed before their
    rename (``.NAME.*.tmp`` beside it, held by no live writer) are removed first.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.bin"
        >>> atomic_write(p, b"abc"); p.read_bytes()
        b'abc'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = _locked_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
            os.replace(tmp, path)  # still locked: a concurrent cleanup never takes a file being written
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of killed saves to ``path``; returns the paths removed.

    A temporary file whose lock can be taken has no live writer (the lock goes
    with the process that held it).
    """
    path = Path(path)
    removed: list[Path] = []
    if fcntl is None or not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{glob_escape(path.name)}.*{_TMP_SUFFIX}"):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live save holds it
            try:
                if os.stat(candidate, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    candidate.unlink()
                    removed.append(candidate)
            except OSError:
                pass
        finally:
            os.close(fd)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with the glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _locked_temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path``, exclusively locked by this process: ``(fd, name)``."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # a cleanup may have removed it between creation and lock: then start again
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)


class NotARegularFileError(ValueError):
    """A path that should name a file names a directory, a FIFO, a device or a socket."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


class RegularFile:
    """A regular file opened for reading without blocking: ``size`` is known, reads are exact.

    Raises ``NotARegularFileError`` (a ``ValueError`` naming the file) for a
    directory, FIFO, device or socket, before reading anything; the
    ``OSError`` s of a missing or unreadable file pass through.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.bin"; p.write_bytes(b"abcdef")
        6
        >>> with RegularFile(p, "artifact") as f:
        ...     f.size, f.read_exact(0, 2, "prefix")
        (6, b'ab')
        >>> RegularFile(p.parent, "artifact")
        Traceback (most recent call last):
        ...
        jaxopt_serve.fileio.NotARegularFileError: artifact ... is a directory, not a file
    """

    def __init__(self, path: str | os.PathLike[str], what: str = "file") -> None:
        self.path, self.what = Path(path), what
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except IsADirectoryError:  # some platforms refuse to open a directory at all
            raise NotARegularFileError(f"{what} {self.path} is a directory, not a file") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise NotARegularFileError(f"{what} {self.path} is {_kind(mode)}, not a file")
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def read_exact(self, offset: int, length: int, part: str) -> bytes:
        """``length`` bytes at ``offset``; ``ValueError`` naming the file and ``part`` if the file is shorter."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.what} {self.path} is truncated: its {part} needs bytes "
                f"{offset}..{offset + length}, the file has {self.size}"
            )
        chunks, done = [], 0
        while done < length:
            chunk = os.pread(self.fd, min(length - done, 1 << 26), offset + done)
            if not chunk:
                raise ValueError(f"{self.what} {self.path} changed while it was read (ends at {offset + done})")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RegularFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_regular(path: str | os.PathLike[str], what: str = "file", *, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (see ``RegularFile``), at most ``max_bytes`` of them.

    Raises:
        NotARegularFileError: ``path`` is a directory, FIFO, device or socket.
        ValueError: the file is larger than ``max_bytes`` (message names the file).
        OSError: the file is missing or cannot be read.
    """
    with RegularFile(path, what) as f:
        if max_bytes is not None and f.size > max_bytes:
            raise ValueError(f"{what} {f.path} is {f.size:,} bytes, more than the {max_bytes:,} expected")
        return f.read_exact(0, f.size, "contents")


def describe_os_error(err: OSError) -> str:
    """One line for an ``OSError``: the reason and the path(s) it concerns.

    Example:
        >>> describe_os_error(FileNotFoundError(2, "No such file or directory", "x.jxs"))
        'x.jxs: No such file or directory'
    """
    reason = err.strerror or str(err) or type(err).__name__
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason
