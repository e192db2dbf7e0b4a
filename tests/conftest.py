"""Shared fixtures: the packaged models, converted once per machine (pretrained.py caches them)."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the larger packaged model (Qwen2.5-Coder-0.5B); still runs in CI")


@pytest.fixture(scope="session")
def smollm2_dir():
    from pretrained import resolve_model
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_dir():
    from pretrained import resolve_model
    return resolve_model("qwen2.5-coder-0.5b-instruct")


# The tiny in-memory BPE tokenizer and one HF-format tokenizer folder per chat family
# (defined in test_tokenizer.py), shared with the data, perplexity and training tests.
from test_tokenizer import family_folders, tokenizer_json  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, family_folders):  # noqa: F811
    """A random SmolLM2-shaped Llama (tied head, GQA) with the tiny tokenizer and SmolLM2's chat
    template, saved by HF transformers as an HF-format folder."""
    import shutil
    transformers = pytest.importorskip("transformers")
    from tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.exists(f"{family_folders['smollm2']}/{f}"):
            shutil.copy(f"{family_folders['smollm2']}/{f}", folder / f)
    tok = Tokenizer.from_folder(folder)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder
