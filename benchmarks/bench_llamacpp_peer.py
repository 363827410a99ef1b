"""llama.cpp as a peer: build it from the source vendored in the ``llama-cpp-python`` sdist, convert
Hugging Face checkpoints to GGUF, quantize, and time them with ``llama-bench`` / ``llama-perplexity``.

Everything is cached under ``.bench/llamacpp/`` (git-ignored): the sdist, the native CPU build
(``GGML_NATIVE=ON``, no CUDA, no curl) and the converted models. Nothing here runs in ``make test``.

    from bench_llamacpp_peer import ensure_llamacpp, convert, quantize, bench
    tools = ensure_llamacpp()                      # builds once (minutes), then reuses the build
    f32 = convert(tools, Path("my-llama-hf"), "f32")
    q8 = quantize(tools, f32, "Q8_0")
    print(bench(tools, q8, threads=2, prompt=512, generate=128))
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".bench" / "llamacpp"
SDIST_VERSION = "0.3.36"  # llama-cpp-python release whose sdist vendors llama.cpp
TARGETS = ("llama-bench", "llama-quantize", "llama-perplexity")


class PeerError(RuntimeError):
    """A peer could not be fetched, built, converted or run (llama.cpp here, the DeepSparse /
    onnxruntime cells of bench_peers.py); the message says which step.

    ``returncode`` is the failed command's exit status (negative: killed by that signal), None when
    no command failed (a missing file or output)::

        raise PeerError("llama.cpp build failed (exit 2): ...", returncode=2)
    """

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode

    @property
    def signalled(self) -> bool:
        """The command died of a signal (a crash), not an ordinary failing exit."""
        return self.returncode is not None and self.returncode < 0


@dataclass(frozen=True)
class LlamaCpp:
    """Paths of one llama.cpp build: its source tree and the built tools."""

    source: Path
    bin: Path
    build_seconds: float  # 0.0 when the cached build was reused

    def tool(self, name: str) -> Path:
        return self.bin / name


def _run(cmd: list[str], step: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise PeerError(f"llama.cpp {step} failed (exit {proc.returncode}): " + "\n".join(tail), proc.returncode)
    return proc


def fetch_source(cache: Path = CACHE) -> Path:
    """The llama.cpp source tree vendored in the llama-cpp-python sdist (downloaded once)."""
    root = cache / f"llama_cpp_python-{SDIST_VERSION}"
    source = root / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").exists():
        return source
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not sdist.exists():
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-build-isolation", "--no-binary", ":all:",
              f"llama-cpp-python=={SDIST_VERSION}", "-d", cache], "download")  # fmt: skip
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    if not (source / "CMakeLists.txt").exists():
        raise PeerError(f"no vendored llama.cpp in {sdist} (expected {source})")
    return source


def ensure_llamacpp(cache: Path = CACHE, jobs: int | None = None) -> LlamaCpp:
    """Build llama-bench, llama-quantize and llama-perplexity once (native CPU build); reuse after."""
    source = fetch_source(cache)
    build = cache / "build"
    bin_dir = build / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return LlamaCpp(source, bin_dir, 0.0)
    start = time.perf_counter()
    _run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
          "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DBUILD_SHARED_LIBS=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], "configure")  # fmt: skip
    _run(["cmake", "--build", build, "--config", "Release", "-j", str(jobs or os.cpu_count() or 2), "--target", *TARGETS],
         "build")  # fmt: skip
    return LlamaCpp(source, bin_dir, time.perf_counter() - start)


def convert(tools: LlamaCpp, hf_dir: Path, outtype: str, out: Path | None = None) -> Path:
    """``convert_hf_to_gguf.py`` of the same source tree; ``outtype`` is f32, bf16 or q8_0."""
    out = out or hf_dir.parent / f"{hf_dir.name}.{outtype}.gguf"
    if out.exists():
        return out
    env = {**os.environ, "PYTHONPATH": str(tools.source / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    tmp = out.with_suffix(".tmp")
    _run([sys.executable, tools.source / "convert_hf_to_gguf.py", hf_dir, "--outtype", outtype, "--outfile", tmp],
         f"convert to {outtype}", env=env)  # fmt: skip
    tmp.rename(out)
    return out


def quantize(tools: LlamaCpp, source_gguf: Path, qtype: str, threads: int = 2) -> Path:
    """``llama-quantize`` a F32/BF16 GGUF to ``qtype`` (Q8_0, Q4_K_M, ...)."""
    out = source_gguf.with_name(source_gguf.name.split(".")[0] + f".{qtype.lower()}.gguf")
    if out.exists():
        return out
    tmp = out.with_suffix(".tmp")
    _run([tools.tool("llama-quantize"), source_gguf, tmp, qtype, str(threads)], f"quantize {qtype}")
    tmp.rename(out)
    return out


def bench(tools: LlamaCpp, gguf: Path, threads: int = 2, prompt: int = 512, generate: int = 128,
          repetitions: int = 3) -> dict[str, float | str]:
    """``llama-bench``: decode tokens/s (``generate`` tokens) and prefill tokens/s (``prompt`` tokens).

    Each is a separate ``llama-bench`` call, so one that fails is reported as ``<key>_error`` and the
    other stays. A call that dies of a signal is retried once with ``--repack 0``: on the Intel AMX
    host the native build's repacked (AMX) quantized prefill dies with a general protection fault,
    while the plain quantized kernels run; ``<key>_note`` then says so.
    """
    result: dict[str, float | str] = {}
    for key, p_tokens, n_tokens in (("decode_tps", 0, generate), ("prefill_tps", prompt, 0)):
        cmd = [tools.tool("llama-bench"), "-m", gguf, "-t", str(threads), "-p", str(p_tokens), "-n", str(n_tokens),
               "-r", str(repetitions), "-o", "json"]
        try:
            try:
                proc = _run(cmd, f"bench {gguf.name}")
            except PeerError as exc:
                if not exc.signalled:
                    raise
                proc = _run([*cmd, "--repack", "0"], f"bench {gguf.name} --repack 0")
                result[key.replace("_tps", "_note")] = f"default run died ({str(exc).splitlines()[0]}); measured with --repack 0"
        except PeerError as exc:
            result[key.replace("_tps", "_error")] = str(exc).splitlines()[0]
            continue
        row = json.loads(proc.stdout)[0]
        result[key] = float(row["avg_ts"])
        result[key.replace("_tps", "_tps_stdev")] = float(row.get("stddev_ts", 0.0))
    return result


@dataclass(frozen=True)
class Perplexity:
    """What :func:`perplexity` measured: the final estimate, and a note when it took a retry."""

    ppl: float
    note: str | None = None


def perplexity(tools: LlamaCpp, gguf: Path, text_file: Path, threads: int = 2, ctx: int = 128,
               chunks: int | None = None, repack: bool = True) -> Perplexity:
    """``llama-perplexity`` over ``text_file`` with windows of ``ctx`` tokens (the first ``chunks``
    windows when given); the final estimate.

    ``repack=False`` passes ``--no-repack``. With ``repack=True`` a run that dies of a signal is
    retried once with ``--no-repack`` and the result's ``note`` says so (see :func:`bench`: the
    repacked AMX quantized path dies on some hosts).
    """
    if not repack:
        return Perplexity(_perplexity_run(tools, gguf, text_file, threads, ctx, chunks, ["--no-repack"]))
    try:
        return Perplexity(_perplexity_run(tools, gguf, text_file, threads, ctx, chunks, []))
    except PeerError as exc:
        if not exc.signalled:
            raise
        ppl = _perplexity_run(tools, gguf, text_file, threads, ctx, chunks, ["--no-repack"])
        return Perplexity(ppl, f"default run died ({str(exc).splitlines()[0][:80]}); measured with --no-repack")


def _perplexity_run(tools: LlamaCpp, gguf: Path, text_file: Path, threads: int, ctx: int,
                    chunks: int | None, extra: list[str]) -> float:
    """One ``llama-perplexity`` invocation (rerun when its log lost the final lines); the estimate."""
    extra = ([] if chunks is None else ["--chunks", str(chunks)]) + extra
    cmd = [tools.tool("llama-perplexity"), "-m", gguf, "-f", text_file, "-t", str(threads), "-c", str(ctx), "-b", str(ctx), *extra]
    for _ in range(3):  # llama.cpp's log thread sometimes loses the last lines at exit: run again
        proc = _run(cmd, f"perplexity {gguf.name}")
        output = proc.stdout + "\n" + proc.stderr
        for line in reversed(output.splitlines()):
            if "Final estimate: PPL =" in line:
                return float(line.split("PPL =")[1].split()[0])
        # the running estimate after the last chunk ("[k]ppl,") is the same number
        running = re.findall(r"\[(\d+)\]([0-9.]+),", output)
        if running and chunks is not None and int(running[-1][0]) == chunks:
            return float(running[-1][1])
    tail = "\n".join(output.strip().splitlines()[-4:])
    raise PeerError(f"llama-perplexity printed no final estimate for {gguf.name} in 3 runs; its output ended with:\n{tail}")


def main() -> None:
    """Build (or reuse) the peer and print where it is and how long the build took."""
    tools = ensure_llamacpp()
    print(json.dumps({"bin": str(tools.bin), "build_seconds": round(tools.build_seconds, 1),
                      "cmake": shutil.which("cmake")}))  # fmt: skip


if __name__ == "__main__":
    main()
