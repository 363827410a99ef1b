"""benchmarks/bench_e2e_llamacpp.py: verdict logic and the peer's result parsing (no llama.cpp build here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmark_modules import load_benchmark


def row(decode, prefill=None):
    return {"decode_tps": decode, "prefill_tps": prefill}


def test_verdicts_judge_from_the_rows_given():
    e2e = load_benchmark("e2e_llamacpp")
    rows = {"llama.cpp bf16": row(14.0, 137.0), "llama.cpp q8_0": row(36.0), "sparseforge dense bf16": row(13.0, 150.0),
            "sparseforge 2:4 fp32 (nm)": row(20.0, 120.0), "sparseforge 75% fp32 (bitmap)": row(30.0, 100.0)}
    lines = e2e.verdicts(rows)
    assert "PASS: dense bf16 decode within 10% of llama.cpp BF16 (13.0 vs 14.0 tokens/s)" in lines
    assert "INFO: sparseforge 75% fp32 (bitmap) decodes 30.0 tokens/s = 0.83x llama.cpp Q8_0" in lines
    assert any(line.startswith("PASS: best sparseforge prefill") for line in lines)
    assert "MISSING: 2:4 + int8 decode >= 1.0x llama.cpp Q8_0: no measurement of both cells" in lines
    rows["sparseforge 2:4 int8 (nm)"] = row(40.0, 100.0)
    rows["sparseforge 75% int8 (bitmap)"] = row(45.0, 100.0)
    rows["sparseforge dense fp32"], rows[e2e.REFERENCE_CELL] = row(9.0), row(6.0)
    lines = e2e.verdicts(rows)
    assert "PASS: 2:4 + int8 decode >= 1.0x llama.cpp Q8_0 (40.0 vs 36.0 tokens/s = 1.11x; sparseforge 2:4 int8 (nm))" in lines
    assert ("FAIL: 75% + int8 decode >= 1.3x llama.cpp Q8_0 (45.0 vs 36.0 tokens/s = 1.25x; sparseforge 75% int8 (bitmap))"
            in lines)
    assert any(line.startswith("INFO: the native engine decodes dense fp32 at 9.0 tokens/s") and "(1.50x)" in line
               for line in lines)
    rows["sparseforge dense bf16"] = row(12.0, 100.0)
    rows["sparseforge 2:4 fp32 (nm)"] = row(20.0, 120.0)
    lines = e2e.verdicts(rows)
    assert any(line.startswith("FAIL: dense bf16 decode") for line in lines)
    assert any(line.startswith("FAIL: best sparseforge prefill") for line in lines)


def test_a_75_percent_n_m_cell_counts_for_the_75_percent_targets():
    e2e = load_benchmark("e2e_llamacpp")
    assert e2e.label_sparsity("4:16") == 0.75 and e2e.label_sparsity("75%") == 0.75 and e2e.label_sparsity("2:4") == 0.5
    assert e2e.label_sparsity("dense") is None
    rows = {"llama.cpp q8_0": row(20.0), "sparseforge dense fp32": row(4.0),
            "sparseforge 75% w8a8 (bitmap; lm_head int8)": row(10.0), "sparseforge 4:16 w8a8 (nm 4:16; lm_head int8)": row(30.0),
            "sparseforge 2:4 w8a8 (nm 2:4; lm_head int8)": row(25.0)}
    lines = e2e.verdicts(rows)
    w8a8_75 = [line for line in lines if line.startswith(("PASS: 75% + int8 weights", "FAIL: 75% + int8 weights"))]
    assert w8a8_75 == [
        "FAIL: 75% + int8 weights and activations (w8a8) decode >= 1.3x llama.cpp Q8_0 (10.0 vs 20.0 tokens/s = 0.50x; "
        "sparseforge 75% w8a8 (bitmap; lm_head int8))",
        "PASS: 75% + int8 weights and activations (w8a8) decode >= 1.3x llama.cpp Q8_0 (30.0 vs 20.0 tokens/s = 1.50x; "
        "sparseforge 4:16 w8a8 (nm 4:16; lm_head int8))"]
    assert any(line.startswith("PASS: sparseforge 4:16 w8a8 (nm 4:16; lm_head int8) decode >= 3.0x dense fp32 (7.50x")
               for line in lines)
    assert not any("2:4 w8a8" in line and "1.3x" in line for line in lines)  # 2:4 is judged against its own target


def test_failed_cells_are_reported_not_averaged():
    e2e = load_benchmark("e2e_llamacpp")
    assert e2e.median_or_none([None, 3.0, 1.0, None, 2.0]) == 2.0
    assert e2e.median_or_none([None, None]) is None
    assert e2e.fmt(None, 1) == "failed" and e2e.fmt(2.345, 1) == "2.3"


def _fake_bench(tmp_path, prefill_script):
    peer = load_benchmark("llamacpp_peer")
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\ncase \"$*\" in *'-p 0 '*) echo '[{\"avg_ts\": 36.4, \"stddev_ts\": 0.2}]';; "
                    f"{prefill_script} esac\n")
    fake.chmod(0o755)
    tools = peer.LlamaCpp(tmp_path, tmp_path, 0.0)
    return peer.bench(tools, tmp_path / "m.gguf", threads=2, prompt=512, generate=128, repetitions=1)


def test_peer_bench_keeps_the_half_that_worked(tmp_path):
    # decode (-p 0) prints llama-bench's JSON; prefill dies of SIGSEGV, with and without --repack 0
    result = _fake_bench(tmp_path, "*) kill -SEGV $$;;")
    assert result["decode_tps"] == 36.4 and result["decode_tps_stdev"] == 0.2
    assert "prefill_tps" not in result and "exit -11" in result["prefill_error"]


def test_peer_bench_retries_a_crashed_run_without_repacking(tmp_path):
    # like the AMX host: the repacked quantized prefill dies, the plain kernels (--repack 0) run
    result = _fake_bench(tmp_path, "*'--repack 0'*) echo '[{\"avg_ts\": 120.5}]';; *) kill -SEGV $$;;")
    assert result["prefill_tps"] == 120.5 and "prefill_error" not in result
    assert "--repack 0" in result["prefill_note"] and "exit -11" in result["prefill_note"]
    assert "decode_note" not in result


def test_peer_bench_does_not_retry_an_ordinary_failure(tmp_path):
    result = _fake_bench(tmp_path, "*'--repack 0'*) echo '[{\"avg_ts\": 1.0}]';; *) exit 3;;")
    assert "prefill_tps" not in result and "exit 3" in result["prefill_error"]


def test_peer_error_carries_the_exit_status(tmp_path):
    peer = load_benchmark("llamacpp_peer")
    tools = peer.LlamaCpp(tmp_path, tmp_path, 0.0)
    for script, code in (("kill -SEGV $$", -11), ("exit 3", 3)):
        fake = tmp_path / "llama-quantize"
        fake.write_text(f"#!/bin/sh\n{script}\n")
        fake.chmod(0o755)
        with pytest.raises(peer.PeerError, match=f"quantize Q8_0 failed \\(exit {code}\\)") as info:
            peer.quantize(tools, tmp_path / "m.f32.gguf", "Q8_0")
        assert info.value.returncode == code and info.value.signalled == (code < 0)
    assert peer.PeerError("no vendored llama.cpp").returncode is None


def test_host_line_names_the_cpu():
    host = load_benchmark("host")
    info = host.host_info()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert info["cpu"] and info["cpu"] in cpuinfo
    assert all(f in cpuinfo for f in info["flags"])
    assert info["cpus"] >= 1


def test_w8a8_cells_get_their_own_verdict_and_the_clock_skips_the_prompt():
    e2e = load_benchmark("e2e_llamacpp")
    rows = {"llama.cpp q8_0": row(36.0), "sparseforge 2:4 int8 (nm)": row(30.0), "sparseforge 2:4 w8a8 (nm)": row(40.0)}
    lines = e2e.verdicts(rows)
    assert "FAIL: 2:4 + int8 decode >= 1.0x llama.cpp Q8_0 (30.0 vs 36.0 tokens/s = 0.83x; sparseforge 2:4 int8 (nm))" in lines
    assert any(line.startswith("PASS: 2:4 + int8 weights and activations (w8a8)") for line in lines)
    clock = e2e.TokenClock()
    clock.put("the prompt")  # not a generated token
    clock.times = [10.0, 10.5, 11.0]  # three generated tokens: two intervals
    assert clock.decode_tps() == 2.0


def test_cells_option_selects_by_text_and_defaults_to_all():
    e2e = load_benchmark("e2e_llamacpp")
    names = ["llama.cpp q8_0", "llama.cpp f32", "sparseforge 75% int8 (bitmap)", "sparseforge 75% w8a8 (bitmap)",
             "sparseforge 2:4 int8 (nm)", "sparseforge dense fp32"]
    assert [n for n in names if e2e.selected(n, None)] == names
    assert [n for n in names if e2e.selected(n, ["q8_0", "75% int8"])] == ["llama.cpp q8_0", "sparseforge 75% int8 (bitmap)"]
    assert not any(e2e.selected(n, ["nothing like it"]) for n in names)
    args = e2e.parse_args(["--cells", "q8_0", "int8", "--start-file", "/tmp/go"])
    assert args.cells == ["q8_0", "int8"] and str(args.start_file) == "/tmp/go"


def test_int8_lm_head_stores_the_head_int8_and_keeps_its_logits_close():
    import transformers as t

    from sparseforge.nn.sparse_linear import SparseLinear

    bench = load_benchmark("e2e_llamacpp")
    torch.manual_seed(0)
    model = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=300)).eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.inference_mode():
        before = model(ids).logits
        bytes_before = bench.weight_bytes_per_token(model)
        assert bench.int8_lm_head_(model) == "; lm_head int8"
        after = model(ids).logits
    head = model.lm_head
    assert isinstance(head, SparseLinear) and head.weight_format.dtype == torch.int8
    assert head.weight_format.nnz == 300 * 64  # nothing pruned: every weight stored (small ones as int8 zeros)
    assert bench.weight_bytes_per_token(model) < bytes_before - 300 * 64 * 2
    assert (after - before).abs().max() < 0.02 * before.abs().max()


def test_int8_lm_head_leaves_a_tied_head_float_and_says_so():
    import transformers as t

    bench = load_benchmark("e2e_llamacpp")
    model = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                             tie_word_embeddings=True)).eval()
    assert bench.int8_lm_head_(model) == "; lm_head float32 (tied)"
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_decode_verdicts_judge_every_values_dtype_against_dense_fp32():
    e2e = load_benchmark("e2e_llamacpp")
    bytes_row = lambda tps, nbytes: {**row(tps), "weight_bytes_per_token": nbytes}  # noqa: E731
    rows = {"sparseforge dense fp32": bytes_row(10.0, 4000), "sparseforge dense bf16": bytes_row(16.0, 2000),
            "sparseforge 2:4 fp32 (nm)": bytes_row(13.0, 2250), "sparseforge 2:4 bf16 (nm)": bytes_row(25.0, 1125),
            "sparseforge 75% bf16 (bitmap)": bytes_row(29.0, 700), "sparseforge 90% fp32 (csr)": bytes_row(40.0, 900)}
    lines = e2e.decode_verdicts(rows)
    assert "FAIL: sparseforge 2:4 fp32 (nm) decode >= 1.8x dense fp32 (1.30x, 0.81x dense bf16; weight-bytes bound 1.78x)" in lines
    assert "PASS: sparseforge 2:4 bf16 (nm) decode >= 1.8x dense fp32 (2.50x, 1.56x dense bf16; weight-bytes bound 3.56x)" in lines
    assert any(line.startswith("FAIL: sparseforge 75% bf16 (bitmap) decode >= 3.0x dense fp32 (2.90x") for line in lines)
    assert not any("90%" in line for line in lines)  # no target for 90%
    rows["sparseforge 2:4 bf16 (no layer converted: dense)"] = bytes_row(30.0, 2000)
    assert any(line.startswith("FAIL: sparseforge 2:4 bf16 (no layer converted: dense) decode >= 1.8x dense fp32 (3.00x")
               and line.endswith("; no layer is sparse)") for line in e2e.decode_verdicts(rows))
    assert e2e.decode_verdicts({"sparseforge 2:4 bf16 (nm)": row(25.0)}) == [
        "MISSING: issue-17 decode targets: no sparseforge dense fp32 measurement"]
    assert any("2:4 bf16" in line for line in e2e.verdicts(rows))  # part of the printed verdicts


def test_bf16_cells_are_bf16_throughout_and_decode_like_the_pruned_model(tmp_path):
    import transformers as t

    from sparseforge.generation.loop import native_generate
    from sparseforge.nn.sparse_linear import SparseLinear

    e2e = load_benchmark("e2e_llamacpp")
    torch.manual_seed(0)
    cfg = t.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    t.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    # the format rule (the default "auto" keeps this tiny model's layers dense: dense is faster at this size)
    cells = e2e.our_variants(tmp_path, ["2:4"], [], cells=["2:4 bf16"], bf16_sparsities=["2:4"], bf16_format="rule")
    (name, (model, sparse, engine)), = cells.items()
    assert name.startswith("sparseforge 2:4 bf16 (") and sparse and engine == "native"
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert layers and all(m.weight_format.dtype == torch.bfloat16 for m in layers)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    # bf16 halves the bytes (a converted layer may not save more: "auto" can pick fanin, 4 B per kept bf16 value)
    assert e2e.weight_bytes_per_token(model) <= 0.5 * e2e.weight_bytes_per_token(
        t.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32))
    ids = torch.randint(1, 300, (1, 5))
    with torch.inference_mode():
        reference = model(ids).logits[0, -1].float()  # transformers' forward over the same SparseLinear layers
        out = native_generate(model, ids, max_new_tokens=1, min_new_tokens=1)
    assert out.shape == (1, 6) and out[0, -1] == reference.argmax()


def test_int8_cells_take_the_asked_format_and_the_w8a8_twin_the_int8_activation_formats(tmp_path):
    import transformers as t
    from sparseforge.nn import SparseLinear

    bench = load_benchmark("e2e_llamacpp")
    model = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=300)).eval()
    model.save_pretrained(tmp_path)
    cells = bench.our_variants(tmp_path, [], ["0.75"], cells=["75% int8", "75% w8a8"], int8_format="csr")
    assert set(cells) == {"sparseforge 75% int8 (csr; lm_head int8)", "sparseforge 75% w8a8 (bitmap; lm_head int8)"}
    int8_model, w8a8_model = (cells[n][0] for n in sorted(cells))
    assert int8_model is not w8a8_model
    proj = [m for n, m in w8a8_model.named_modules() if isinstance(m, SparseLinear) and n != "lm_head"]
    assert len(proj) == 7 and all(m.activations == "int8" for m in proj)
    assert all(m.activations == "float" for m in int8_model.modules() if isinstance(m, SparseLinear))
