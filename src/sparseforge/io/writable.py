"""Check, before any long work starts, that an output path can be written.

A prune, advise or train run can take minutes; finding a read-only ``--out`` / ``--json`` /
``--plot`` only when the result is saved loses all of it. These checks run at the edge (CLI and
the pipeline functions) and raise :class:`~sparseforge.errors.ConfigError` naming the option and
the fix. Writability is probed by creating (and removing) a temporary file in the nearest existing
ancestor directory, so read-only mounts, immutable directories and missing permissions are all
caught, also when running as root (where ``os.access`` says yes to everything).

Example:
    >>> from sparseforge.io.writable import check_output_dir, check_output_file
    >>> check_output_dir("pruned", overwrite=False, option="--out")       # doctest: +SKIP
    >>> check_output_file("timings.json", option="--json")                # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sparseforge.errors import ConfigError

__all__ = ["check_output_dir", "check_output_file"]


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``path`` is absolute)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor)


def _check_can_create_in(path: Path, option: str) -> None:
    """ConfigError unless ``path`` (a file or directory to be created) could be created."""
    path = Path(os.path.abspath(path))
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ConfigError(f"{option} {path}: {base} is a file, not a directory; choose another {option}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sparseforge-write-probe-", dir=base)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{option} {path}: cannot write in {base} ({reason}); choose a writable location") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: "str | Path", *, overwrite: bool, option: str = "--out") -> None:
    """ConfigError unless ``path`` can become an output directory.

    It must not be an existing file; an existing non-empty directory needs ``overwrite`` and must be
    a model directory (hold a ``config.json``), as :func:`sparseforge.checkpoint.save_pretrained` requires; the
    directory that will hold it (its parent, or the nearest ancestor that exists) must be writable,
    because saves build the new directory next to it and rename it into place.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} exists and is a file, not a directory; choose another {option}")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {path} exists and is not empty; pass --overwrite to replace it")
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"refusing to replace {path}: it is not empty and holds no config.json, so it is not a model "
                f"directory; choose an empty or new {option}"
            )
    _check_can_create_in(path, option)


def check_output_file(path: "str | Path | None", *, option: str) -> None:
    """ConfigError unless ``path`` (``None``: nothing to check) can be written as a file."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give a file name")
    _check_can_create_in(path, option)
