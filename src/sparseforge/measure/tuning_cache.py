"""Measured choices, kept per machine: a small on-disk cache keyed by the CPU and the question asked.

Every ``"auto"`` in sparseforge (the format advisor, the MoE decode backend) decides by timing the
candidates on the machine it runs on. Timing costs seconds, so the answer is stored once per
(CPU model, CPU flags, kernel ISA, threads, torch and sparseforge versions, question) and reused;
a different CPU, thread count or library version never reuses another's answer.

Where: ``$SPARSEFORGE_CACHE_DIR/tuning.json`` if that variable is set, else
``$XDG_CACHE_HOME/sparseforge/tuning.json``, else ``~/.cache/sparseforge/tuning.json``.
Clear it with ``sparseforge cache clear`` (or delete the file); ``SPARSEFORGE_TUNING_CACHE=off``
disables reading and writing it (every decision is measured afresh). Writes go to a temporary file
that is renamed over the old one, so a crash never leaves half a file; an unreadable file is
reported and replaced on the next write, never trusted.

Example:
    >>> import tempfile, os
    >>> from sparseforge.measure.tuning_cache import TuningCache
    >>> cache = TuningCache(os.path.join(tempfile.mkdtemp(), "tuning.json"))
    >>> cache.get("demo", {"shape": [4, 4]}) is None
    True
    >>> cache.put("demo", {"shape": [4, 4]}, {"choice": "dense"})
    >>> cache.get("demo", {"shape": [4, 4]})
    {'choice': 'dense'}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Optional

__all__ = ["TuningCache", "default_path", "cpu_fingerprint", "enabled"]

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def default_path() -> Path:
    """Where the cache lives (module doc)."""
    if os.environ.get("SPARSEFORGE_CACHE_DIR"):
        return Path(os.environ["SPARSEFORGE_CACHE_DIR"]) / "tuning.json"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sparseforge" / "tuning.json"


def enabled() -> bool:
    """False when ``SPARSEFORGE_TUNING_CACHE`` is ``off`` / ``0`` / ``no``."""
    return os.environ.get("SPARSEFORGE_TUNING_CACHE", "on").strip().lower() not in ("off", "0", "no", "false")


def _cpuinfo_fields() -> tuple[str, str]:
    """(CPU model name, its sorted flags) from /proc/cpuinfo; the platform's names where absent."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or fields.get("CPU part") or platform.processor() or platform.machine()
    flags = fields.get("flags") or fields.get("Features") or ""
    return model, " ".join(sorted(flags.split()))


def cpu_fingerprint(threads: int) -> dict[str, Any]:
    """What an answer depends on besides the question: CPU model and flags (hashed), the kernel ISA,
    ``threads``, and the torch and sparseforge versions."""
    import torch

    import sparseforge
    from sparseforge import kernels

    model, flags = _cpuinfo_fields()
    return {"cpu": model, "flags": hashlib.sha1(flags.encode()).hexdigest()[:12], "isa": kernels.isa(),
            "threads": int(threads), "torch": torch.__version__, "sparseforge": sparseforge.__version__}


def _key(kind: str, fingerprint: dict[str, Any], question: dict[str, Any]) -> str:
    text = json.dumps({"kind": kind, "machine": fingerprint, "question": question}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


_LAST_READ: dict[str, Any] = {}  # the file last parsed: its (path, mtime, size) stamp and entries


class TuningCache:
    """A JSON file of ``{key: {"kind", "machine", "question", "answer"}}`` entries (module doc)."""

    def __init__(self, path: "str | Path | None" = None):
        self.path = Path(path) if path is not None else default_path()

    def _read(self) -> dict[str, Any]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        except OSError:
            stat = None
        stamp = None if stat is None else (str(self.path), stat.st_mtime_ns, stat.st_size)
        if stamp is not None and _LAST_READ.get("stamp") == stamp:  # unchanged since the last read: parsed already
            return dict(_LAST_READ["entries"])
        entries = self._parse()
        if stamp is not None:
            _LAST_READ.update(stamp=stamp, entries=dict(entries))
        return entries

    def _parse(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable tuning cache %s (%s); it is rewritten on the next measurement",
                        self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
            log.warning("ignoring tuning cache %s: not a version-%d sparseforge cache", self.path, CACHE_VERSION)
            return {}
        return data["entries"]

    def get(self, kind: str, question: dict[str, Any], threads: Optional[int] = None) -> Optional[Any]:
        """The stored answer to ``question`` on this machine, or ``None``."""
        if not enabled():
            return None
        entry = self._read().get(_key(kind, self._fingerprint(threads), question))
        return None if entry is None else entry["answer"]

    def put(self, kind: str, question: dict[str, Any], answer: Any, threads: Optional[int] = None) -> None:
        """Store ``answer`` (JSON-serialisable) for ``question`` on this machine."""
        if not enabled():
            return
        fingerprint = self._fingerprint(threads)
        entries = self._read()
        entries[_key(kind, fingerprint, question)] = {"kind": kind, "machine": fingerprint, "question": question,
                                                      "answer": answer}
        self._write({"version": CACHE_VERSION, "entries": entries})

    def entries(self) -> list[dict[str, Any]]:
        """Every stored entry (any machine), for ``sparseforge cache show``."""
        return list(self._read().values())

    def clear(self) -> int:
        """Delete the file; returns how many entries it held."""
        n = len(self._read())
        _LAST_READ.clear()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        return n

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True, default=str)
            os.replace(tmp, self.path)
            stat = self.path.stat()
            _LAST_READ.update(stamp=(str(self.path), stat.st_mtime_ns, stat.st_size), entries=dict(data["entries"]))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @staticmethod
    def _fingerprint(threads: Optional[int]) -> dict[str, Any]:
        import torch

        return cpu_fingerprint(torch.get_num_threads() if threads is None else threads)
