"""The kernels' thread pool under stress: many jobs back to back, jobs from several Python threads at
once, jobs while another process keeps the cores busy, and resizing in between. Every result is
checked against the single-threaded result (the pool must neither lose nor repeat a task)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from sparseforge import kernels
from sparseforge.formats.csr import CSRWeight
from sparseforge.ops import linear


def _weights(n: int = 6):
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        rows, cols = 256 + 37 * k, 384 + 29 * k  # ~30-60 k stored weights: the pool splits all but batch 1
        w = torch.randn(rows, cols, generator=g)
        out.append(CSRWeight.from_dense(w, torch.rand(rows, cols, generator=g) < 0.3))
    return out


def _expected(weights, xs):
    before = kernels.num_threads()
    kernels.set_num_threads(1)
    try:
        return [linear(x, w) for w, x in zip(weights, xs)]
    finally:
        kernels.set_num_threads(before)


def test_many_jobs_back_to_back_give_the_serial_result():
    weights = _weights()
    xs = [torch.randn(b, w.shape[1]) for w, b in zip(weights, (1, 3, 17, 64, 65, 200))]
    want = _expected(weights, xs)
    kernels.set_num_threads(4)  # more workers than cores: some are always descheduled
    try:
        for _ in range(300):
            for w, x, y in zip(weights, xs, want):
                assert torch.equal(linear(x, w), y)
    finally:
        kernels.set_num_threads(os.cpu_count() or 1)


def test_jobs_from_several_python_threads():
    weights = _weights()
    xs = [torch.randn(b, w.shape[1]) for w, b in zip(weights, (2, 5, 16, 33, 64, 130))]
    want = _expected(weights, xs)
    kernels.set_num_threads(3)
    errors: list[str] = []

    def worker(k: int) -> None:
        for i in range(150):
            j = (i + k) % len(weights)
            if not torch.equal(linear(xs[j], weights[j]), want[j]):
                errors.append(f"thread {k} call {i} layer {j}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        kernels.set_num_threads(os.cpu_count() or 1)
    assert not errors, errors[:5]


def test_resizing_between_jobs():
    weights = _weights(3)
    xs = [torch.randn(20, w.shape[1]) for w in weights]
    want = _expected(weights, xs)
    try:
        for n in (1, 2, 5, 2, 3, 1, 4):
            kernels.set_num_threads(n)
            for w, x, y in zip(weights, xs, want):
                assert torch.equal(linear(x, w), y)
    finally:
        kernels.set_num_threads(os.cpu_count() or 1)


def test_jobs_while_the_cores_are_busy():
    burn = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 8: pass"])
    try:
        test_many_jobs_back_to_back_give_the_serial_result()
    finally:
        burn.kill()
        burn.wait()


def _expert_problem(seed: int = 0):
    """A decode step big enough for the pool (>= 2^16 weights streamed): 2 tokens, 3 of 4 experts."""
    g = torch.Generator().manual_seed(seed)
    E, d, h = 4, 96, 256
    w_gate, w_up, w_down = (torch.randn(E, d, h, generator=g), torch.randn(E, d, h, generator=g),
                            torch.randn(E, h, d, generator=g))
    x = torch.randn(2, d, generator=g)
    experts, weights = torch.tensor([[0, 2], [2, 3]]), torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    return x, experts, weights, w_up, w_down, w_gate


def test_workers_park_after_a_job_that_asks_and_poll_after_one_that_does_not():
    from sparseforge.ops.expert_ffn import expert_ffn

    args = _expert_problem()
    serial = expert_ffn(*args, parallel=False)
    before = kernels.num_threads()
    kernels.set_num_threads(3)
    try:
        for w in _weights(2):
            linear(torch.randn(40, w.shape[1]), w)  # the pool exists and its workers have waited at least once
        time.sleep(0.05)
        polled0, parked0 = kernels.pool_wait_counts()
        for _ in range(20):
            assert torch.equal(expert_ffn(*args, parallel=True, park_workers=False), serial)
            time.sleep(0.002)
        time.sleep(0.05)
        polled1, parked1 = kernels.pool_wait_counts()
        assert parked1 == parked0, "no job asked to park, yet a worker went to sleep without polling"
        assert polled1 > polled0
        for _ in range(20):
            assert torch.equal(expert_ffn(*args, parallel=True), serial)  # park_workers=True is the default
            time.sleep(0.002)
        time.sleep(0.05)
        _, parked2 = kernels.pool_wait_counts()
        assert parked2 > parked1, "the decode kernel's last job asks the workers to park, but none did"
    finally:
        kernels.set_num_threads(before)


def test_kernels_back_to_back_after_parked_jobs_give_the_serial_result():
    from sparseforge.ops.expert_ffn import expert_ffn

    args = _expert_problem(1)
    serial = expert_ffn(*args, parallel=False)
    weights = _weights(3)
    xs = [torch.randn(b, w.shape[1]) for w, b in zip(weights, (3, 17, 64))]
    want = _expected(weights, xs)
    before = kernels.num_threads()
    kernels.set_num_threads(4)  # more workers than cores
    try:
        for i in range(200):  # parked and polling waits alternate; every job still runs each task once
            assert torch.equal(expert_ffn(*args, parallel=True, park_workers=i % 3 != 0), serial)
            for w, x, y in zip(weights, xs, want):
                assert torch.equal(linear(x, w), y)
    finally:
        kernels.set_num_threads(before)


def test_a_held_pool_polls_even_after_parking_jobs_and_parks_again_when_released():
    from sparseforge.errors import ConfigError
    from sparseforge.ops.expert_ffn import expert_ffn

    args = _expert_problem()
    serial = expert_ffn(*args, parallel=False)
    before = kernels.num_threads()
    kernels.set_num_threads(3)
    try:
        assert kernels.native().pool_holders() == 0
        with kernels.pool_held():
            with kernels.pool_held():  # nests
                assert kernels.native().pool_holders() == 2
            time.sleep(0.05)
            _, parked0 = kernels.pool_wait_counts()
            for _ in range(20):
                assert torch.equal(expert_ffn(*args, parallel=True), serial)  # each job asks the workers to park
                time.sleep(0.002)
            time.sleep(0.05)
            _, parked1 = kernels.pool_wait_counts()
            assert parked1 == parked0, "the pool is held, yet a worker went to sleep at once"
        assert kernels.native().pool_holders() == 0
        for _ in range(20):
            assert torch.equal(expert_ffn(*args, parallel=True), serial)
            time.sleep(0.002)
        time.sleep(0.05)
        _, parked2 = kernels.pool_wait_counts()
        assert parked2 > parked1, "released, the parking jobs put no worker to sleep"
        with pytest.raises(ConfigError, match="hold\\(false\\) without a matching hold\\(true\\)"):
            kernels.native().pool_hold(False)
        assert kernels.native().pool_holders() == 0
    finally:
        kernels.set_num_threads(before)


def test_a_held_pool_is_released_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with kernels.pool_held():
            raise RuntimeError("boom")
    assert kernels.native().pool_holders() == 0
