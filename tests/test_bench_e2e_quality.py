"""benchmarks/bench_e2e_quality.py: llama-perplexity's protocol for our models, the peer's output
parsing, and the speed join (no llama.cpp build here)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from benchmark_modules import load_benchmark


class BigramLM(torch.nn.Module):
    """logits[t] depend on input[t] only (a lookup table): lets a test compute the NLL by hand."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def by_hand(table, ids, ctx, chunks, bos, first=None):
    """llama-perplexity: chunk i scores positions ctx/2 .. ctx-2 predicting the next original token;
    the first input token of a chunk is BOS when ``bos`` is given (it is never scored)."""
    nll, count = 0.0, 0
    for i in range(chunks):
        chunk = ids[i * ctx:(i + 1) * ctx].tolist()
        inputs = list(chunk)
        if bos is not None:
            inputs[0] = bos
        for pos in range(ctx // 2 if first is None else first, ctx - 1):
            logp = torch.log_softmax(table[inputs[pos]].double(), -1)
            nll -= logp[chunk[pos + 1]].item()
            count += 1
    return math.exp(nll / count)


def test_protocol_perplexity_scores_the_second_half_of_each_chunk():
    q = load_benchmark("e2e_quality")
    model = BigramLM(50)
    ids = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(1))
    for ctx, chunks, bos in ((16, 5, None), (17, 3, 7), (64, 100, None)):
        n = min(1000 // ctx, chunks)
        got = q.protocol_perplexity(model, ids, ctx, chunks, bos, batch=2)
        assert math.isclose(got, by_hand(model.table, ids, ctx, n, bos), rel_tol=1e-6)
    # scoring every position instead (our own eval protocol) gives a different number
    assert not math.isclose(q.protocol_perplexity(model, ids, 16, 5, None), by_hand(model.table, ids, 16, 5, None, first=0), rel_tol=1e-3)


def test_protocol_ids_put_bos_first_only_when_llama_cpp_does():
    q = load_benchmark("e2e_quality")

    class Tok:
        bos_token_id = 0

        def __call__(self, text, add_special_tokens, verbose):
            return {"input_ids": [5, 6, 7]}

    assert q.protocol_ids(Tok(), "abc", add_bos=False).tolist() == [5, 6, 7]
    assert q.protocol_ids(Tok(), "abc", add_bos=True).tolist() == [0, 5, 6, 7]


def _fake_perplexity(tmp_path, script: str):
    peer = load_benchmark("llamacpp_peer")
    fake = tmp_path / "llama-perplexity"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    tools = peer.LlamaCpp(tmp_path, tmp_path, 0.0)
    return peer, tools


def test_peer_perplexity_reads_the_final_estimate_or_the_last_running_one(tmp_path):
    peer, tools = _fake_perplexity(tmp_path, "echo '[1]70.1,[2]65.5,' ; echo 'I Final estimate: PPL = 65.5012 +/- 2.1' >&2\n")
    assert peer.perplexity(tools, tmp_path / "m.gguf", tmp_path / "t.txt", chunks=2).ppl == 65.5012
    # the final line lost at exit: the running estimate after the last chunk is the same number
    peer, tools = _fake_perplexity(tmp_path, "echo '[1]70.1,[2]65.5012,'\n")
    assert peer.perplexity(tools, tmp_path / "m.gguf", tmp_path / "t.txt", chunks=2).ppl == 65.5012


def test_peer_perplexity_reports_output_that_never_completes(tmp_path):
    peer, tools = _fake_perplexity(tmp_path, "echo '[1]70.1,'; echo 'perplexity: 1.4 seconds per pass - ETA' >&2\n")
    try:
        peer.perplexity(tools, tmp_path / "m.gguf", tmp_path / "t.txt", chunks=2)
    except peer.PeerError as exc:
        assert "no final estimate" in str(exc) and "ETA" in str(exc)
    else:
        raise AssertionError("an incomplete run must raise PeerError")


def test_peer_perplexity_passes_no_repack_when_asked(tmp_path):
    peer, tools = _fake_perplexity(tmp_path, "case \"$*\" in *--no-repack*) echo '[1]61.0,';; *) kill -SEGV $$;; esac\n")
    forced = peer.perplexity(tools, tmp_path / "m.gguf", tmp_path / "t.txt", chunks=1, repack=False)
    assert forced.ppl == 61.0 and forced.note is None


def test_peer_perplexity_retries_a_crashed_run_without_repacking(tmp_path):
    # like the AMX host: the repacked quantized path dies of a signal, --no-repack runs
    peer, tools = _fake_perplexity(tmp_path, "case \"$*\" in *--no-repack*) echo '[1]61.0,';; *) kill -SEGV $$;; esac\n")
    retried = peer.perplexity(tools, tmp_path / "m.gguf", tmp_path / "t.txt", chunks=1)
    assert retried.ppl == 61.0 and "--no-repack" in retried.note and "exit -11" in retried.note


def test_peer_perplexity_does_not_retry_an_ordinary_failure(tmp_path):
    peer, tools = _fake_perplexity(tmp_path, "case \"$*\" in *--no-repack*) echo '[1]61.0,';; *) exit 3;; esac\n")
    try:
        peer.perplexity(tools, tmp_path / "m.gguf", tmp_path / "t.txt", chunks=1)
    except peer.PeerError as exc:
        assert exc.returncode == 3 and not exc.signalled
    else:
        raise AssertionError("a failed run must raise PeerError, not retry")


def test_fine_tuned_rows_join_the_speed_of_their_kernels():
    bench = load_benchmark("e2e_quality")
    assert bench.speed_key("sparseforge 2:4 w8a8, 200 SquareHead steps (nm 2:4)") == "sparseforge 2:4 w8a8"
    assert bench.speed_key("sparseforge 2:4 int8 (nm 2:4)") == "sparseforge 2:4 int8"


def test_recovered_keeps_the_zeros_moves_the_rest_and_reuses_its_cache(tmp_path):
    import copy

    import sparseforge as sf
    from tiny_models import VOCAB, tiny_model

    bench = load_benchmark("e2e_quality")
    dense = tiny_model("llama", seed=1)
    pruned = copy.deepcopy(dense)
    sf.sparsify_(pruned, sf.SparsifyConfig(method="magnitude", pattern="2:4"), progress=False)
    data = torch.randint(0, VOCAB, (6000,), generator=torch.Generator().manual_seed(0))
    tuned = bench.recovered(pruned, dense, None, "2:4", 3, tmp_path, data=data)
    w0, w1 = pruned.model.layers[0].mlp.down_proj.weight, tuned.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w1 == 0, w0 == 0) and not torch.equal(w0, w1)  # the mask kept, the kept weights trained
    assert (tmp_path / "builtin-sparsegpt-2of4-squarehead3.pt").exists()
    again = bench.recovered(pruned, dense, None, "2:4", 3, tmp_path, data=torch.zeros(1, dtype=torch.long))  # cached
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), again.state_dict().values()))
