"""Crash-safe directory replacement: a process killed at every step of a save leaves a directory
that the next save or load finishes or rolls back, and no stale temporaries."""

import fcntl
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparseforge.io.atomic_dir import exchange_supported, recover, replace_dir

KILLED = 9  # exit status of the child at its injected kill point


def _write(directory, version):
    (directory / "version.txt").write_text(version)
    (directory / "sub").mkdir()
    (directory / "sub" / "weights.bin").write_bytes(version.encode() * 1000)


def _version(directory):
    text = (directory / "version.txt").read_text()
    assert (directory / "sub" / "weights.bin").read_bytes() == text.encode() * 1000, "torn directory"
    return text


def _leftovers(out):
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}."))


def _child(out, patch, exchange=True):
    """Replace ``out`` by version "new" in a child process whose ``patch`` code kills it (os._exit)."""
    code = "\n".join([
        "import os, pathlib",
        "import sparseforge.io.atomic_dir as ad",
        "calls = []",
        "def kill(*_):",
        f"    os._exit({KILLED})",
        "" if exchange else "ad._exchange = lambda a, b: False",
        patch,
        f"out = pathlib.Path({str(out)!r})",
        "with ad.replace_dir(out) as tmp:",
        "    (tmp / 'version.txt').write_text('new')",
        "    (tmp / 'sub').mkdir()",
        "    (tmp / 'sub' / 'weights.bin').write_bytes(b'new' * 1000)",
    ])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _old_dir(tmp_path):
    out = tmp_path / "ckpt"
    with replace_dir(out) as tmp:
        _write(tmp, "old")
    assert _version(out) == "old" and _leftovers(out) == []
    return out


# (patch applied in the child, exchange available, version expected after recovery)
KILL_POINTS = {
    "while writing the new copy": ("ad._publishable = kill", True, "old"),
    "right after the exchange": ("ad._remove = kill", True, "new"),
    "while deleting the old copy": (
        "real = ad._remove\n"
        "def partial(p):\n"
        "    (p / 'sub' / 'weights.bin').unlink(); os._exit(9)\n"
        "ad._remove = partial", True, "new"),
    "between the two renames": (
        "real = os.rename\n"
        "def rename(a, b):\n"
        "    calls.append(a)\n"
        "    if len(calls) == 2: os._exit(9)\n"
        "    real(a, b)\n"
        "os.rename = rename", False, "new"),
    "after the renames, before deleting the old copy": ("ad._remove = kill", False, "new"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
@pytest.mark.parametrize("via", ["load", "save"])
def test_a_kill_at_each_step_is_finished_or_rolled_back(tmp_path, point, via):
    out = _old_dir(tmp_path)
    patch, exchange, expected = KILL_POINTS[point]
    if exchange and not exchange_supported():
        pytest.fail("renameat2 is missing from the C library: the exchange path cannot be tested")
    r = _child(out, patch, exchange=exchange)
    assert r.returncode == KILLED, r.stderr
    assert _leftovers(out), "the kill point left nothing behind: the injection did not happen where intended"
    if via == "load":
        recover(out)  # what every load of the directory does first
        assert _version(out) == expected
    else:  # a new save of the same directory recovers first, then replaces
        with replace_dir(out) as tmp:
            assert _version(out) == expected
            _write(tmp, "third")
        assert _version(out) == "third"
    assert _leftovers(out) == []


def test_a_first_save_killed_before_publishing_leaves_nothing(tmp_path):
    out = tmp_path / "fresh"
    r = _child(out, "real = os.rename\nos.rename = kill")
    assert r.returncode == KILLED, r.stderr
    assert not out.exists() and _leftovers(out)
    recover(out)
    assert not out.exists() and _leftovers(out) == []


def test_an_error_in_the_second_rename_restores_the_old_copy(tmp_path, monkeypatch):
    import sparseforge.io.atomic_dir as ad

    out = _old_dir(tmp_path)
    monkeypatch.setattr(ad, "_exchange", lambda a, b: False)
    real = os.rename

    def rename(a, b):
        if str(b) == str(out) and ".tmp-" in str(a):
            raise OSError(28, "No space left on device")
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        with replace_dir(out) as tmp:
            _write(tmp, "new")
    assert _version(out) == "old" and _leftovers(out) == []


def test_an_error_inside_the_block_keeps_the_old_copy(tmp_path):
    out = _old_dir(tmp_path)
    with pytest.raises(RuntimeError):
        with replace_dir(out) as tmp:
            _write(tmp, "new")
            raise RuntimeError("failed half-way")
    assert _version(out) == "old" and _leftovers(out) == []


def test_a_save_in_flight_in_another_process_is_left_alone(tmp_path):
    out = _old_dir(tmp_path)
    live = tmp_path / ".ckpt.tmp-0123456789ab"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)  # a new open file description: a separate flock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        recover(out)
        assert live.is_dir()
    finally:
        os.close(fd)
    recover(out)
    assert not live.exists()


def test_names_of_other_directories_are_never_touched(tmp_path):
    out = _old_dir(tmp_path)
    others = [tmp_path / ".ckpt.tmp-b.tmp-0123456789ab", tmp_path / ".ckpt2.old-0123456789ab",
              tmp_path / ".ckpt.old-notahexname1", tmp_path / "ckpt.tmp-0123456789ab"]
    for d in others:
        d.mkdir()
    recover(out)
    assert all(d.is_dir() for d in others)


def test_replacement_keeps_world_readable_permissions(tmp_path):
    out = _old_dir(tmp_path)
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert os.stat(out / "version.txt").st_mode & 0o777 == 0o644


PRUNED_MODEL = textwrap.dedent("""
    def pruned(seed):
        from tiny_models import tiny_model
        from sparseforge import SparsifyConfig, sparsify_
        model = tiny_model("llama", seed=seed)
        sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.5), progress=False)
        return model
""")


def test_save_pretrained_killed_at_the_second_rename_loses_nothing(tmp_path):
    """The issue's reproduction (a kill at the second rename of an --overwrite save), end to end:
    the next load finds the new checkpoint, complete, and no temporaries."""
    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.loading import load
    from sparseforge.pipeline import weights_equal

    scope = {}
    exec(PRUNED_MODEL, scope)
    out = tmp_path / "model"
    save_pretrained(scope["pruned"](0), out, sparsity_config={"method": "magnitude"})
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where tiny_models.py lives
    code = "import os, sys\n" + f"sys.path.insert(0, {tests_dir!r})\n" + PRUNED_MODEL + textwrap.dedent(f"""
        real, calls = os.rename, []
        def rename(a, b):
            calls.append(a)
            if len(calls) == 2:
                os._exit({KILLED})
            real(a, b)
        os.rename = rename
        from sparseforge.io.checkpoint import save_pretrained
        save_pretrained(pruned(1), {str(out)!r}, overwrite=True, sparsity_config={{"method": "magnitude"}})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, KILLED), r.stderr
    loaded = load(out)  # recovers first, whichever step the save reached
    assert _leftovers(out) == []
    assert weights_equal(loaded, scope["pruned"](1))
