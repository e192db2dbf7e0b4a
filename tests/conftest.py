"""Shared fixtures: the packaged models, converted once per machine (pretrained.py caches them)."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_dir():
    from pretrained import resolve_model
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_dir():
    from pretrained import resolve_model
    return resolve_model("qwen2.5-coder-0.5b-instruct")
