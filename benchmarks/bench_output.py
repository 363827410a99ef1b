"""Where a benchmark's results go: ``write_json(path, data)`` writes the JSON next to a temporary
file and renames it into place, so an interrupted run never leaves a half-written result.

    from bench_output import write_json
    write_json(args.out, result)   # creates the folder; the file ends with a newline
"""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: "str | Path", data, indent: int = 2) -> Path:
    """``data`` as JSON at ``path`` (folders created), written to ``path.tmp`` then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
