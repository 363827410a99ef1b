"""Crash-safe creation and replacement of a directory (a saved checkpoint), with recovery.

A save builds the new directory as ``.NAME.tmp-TOKEN`` next to ``NAME`` and publishes it:

* ``NAME`` does not exist: ``rename(.NAME.tmp-TOKEN, NAME)``, one atomic step.
* ``NAME`` exists, Linux ``renameat2(RENAME_EXCHANGE)`` available: the two directories are swapped
  in one atomic step (``NAME`` is always a complete checkpoint, old or new), then the old one, now
  under the temporary name, is deleted.
* otherwise: ``rename(NAME, .NAME.old-TOKEN)`` then ``rename(.NAME.tmp-TOKEN, NAME)``, then the old
  one is deleted. Between the two renames ``NAME`` is missing.

Every file is fsync'ed before it is published, so the steps also order on disk. A process killed at
any point leaves hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` entries; :func:`recover` (called at the
start of every save and load of ``NAME``) finishes or rolls back the interrupted replacement:

* ``NAME`` exists: every stale ``.NAME.tmp-*`` / ``.NAME.old-*`` is deleted (a partial new write, or
  the old copy a finished replacement had still to delete).
* ``NAME`` is missing and ``.NAME.old-T`` exists: with ``.NAME.tmp-T`` (same token) the new copy
  was complete (the old one is moved aside only after that), so the replacement is finished by
  renaming it into place; without it the old copy is put back.

An entry is stale only when no process holds it: a save keeps an ``flock`` on its temporary
directory until it is done, so a concurrent save or load never deletes another one's work in flight.

Example:
    >>> from sparseforge.io.atomic_dir import replace_dir
    >>> with replace_dir("out") as tmp:                 # doctest: +SKIP
    ...     (tmp / "config.json").write_text("{}")
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["replace_dir", "recover", "exchange_supported"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_TOKEN = r"[0-9a-f]{12}"


def _load_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange_supported() -> bool:
    """Whether this platform's C library offers ``renameat2`` (the file system may still refuse it)."""
    return _renameat2 is not None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the entries ``a`` and ``b``; False when the OS or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _names(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-({_TOKEN})$")


def _held(path: Path) -> bool:
    """True while some process holds the flock of directory ``path`` (or when that cannot be told)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's own lock
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def recover(out: "str | Path") -> None:
    """Finish or roll back an interrupted replacement of ``out`` and delete stale temporaries.

    Safe to call at any time (does nothing when nothing was interrupted); a location this process
    cannot write is left as it is.
    """
    out = Path(os.path.abspath(out))
    pattern = _names(out)
    try:
        entries = [(m.group(1), m.group(2), out.parent / n) for n in os.listdir(out.parent) if (m := pattern.match(n))]
    except OSError:
        return
    if not entries:
        return
    by_token: dict[str, dict[str, Path]] = {}
    for kind, token, path in entries:
        by_token.setdefault(token, {})[kind] = path
    stale = {t: kinds for t, kinds in by_token.items() if not any(_held(p) for p in kinds.values())}
    try:
        if not os.path.lexists(out):
            newest = sorted((t for t in stale if "old" in stale[t]), key=lambda t: stale[t]["old"].stat().st_mtime)
            if newest:
                kinds = stale[newest[-1]]
                # moved aside only once the new copy was complete: finish with it, else roll back
                os.rename(kinds.get("tmp", kinds["old"]), out)
                _fsync_dir(out.parent)
        if os.path.lexists(out):
            for kinds in stale.values():
                for path in kinds.values():
                    _remove(path)
        else:  # a first save that never finished: nothing to restore
            for kinds in stale.values():
                _remove(kinds["tmp"])
    except OSError:
        return


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publishable(tmp: Path) -> None:
    """World-readable permissions (mkdir 0700 and safetensors create owner-only entries), then fsync."""
    for root, dirs, files in os.walk(tmp):
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o644)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
            _fsync_dir(Path(root) / name)
    os.chmod(tmp, 0o755)
    _fsync_dir(tmp)


@contextmanager
def replace_dir(out: "str | Path") -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out``; on success it replaces ``out`` atomically.

    On an exception inside the block the temporary directory is deleted and ``out`` is untouched.
    """
    out = Path(os.path.abspath(out))  # a proper name and parent even for "." or "dir/"
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    token = uuid.uuid4().hex[:12]
    tmp = out.parent / f".{out.name}.tmp-{token}"
    os.mkdir(tmp, 0o700)
    lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # marks the temporary directory as in use (see recover)
        yield tmp
        _publishable(tmp)
        _publish(tmp, out, out.parent / f".{out.name}.old-{token}")
    finally:
        os.close(lock)
        if os.path.lexists(tmp):
            _remove(tmp)


def _publish(tmp: Path, out: Path, old: Path) -> None:
    """Put the complete directory ``tmp`` at ``out``; the previous ``out`` is deleted."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
    elif _exchange(tmp, out):  # out: new, tmp: old
        _fsync_dir(out.parent)
        _remove(tmp)
        return
    else:
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
    _fsync_dir(out.parent)
    if os.path.lexists(old):
        _remove(old)
