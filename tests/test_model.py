"""model.py against HF transformers on tiny random configs, plus generation and loading errors."""

import json

import pytest
import torch

import fast
from generation import generate
from model import ModelConfig, ModelLoadError, Transformer, rope_inv_freq

transformers = pytest.importorskip("transformers")

VOCAB = 128
CONFIGS = {
    # GQA, tied head, Llama-3 rope scaling
    "llama3-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # plain multi-head attention, untied head
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, num_key_value_heads=4)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    # bias on q/k/v, untied head
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


def make_hf(kind, folder, seed=0):
    cfg_cls, model_cls, extra = CONFIGS[kind]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    kw.update(extra)
    cfg = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # random biases, so that a dropped bias would show
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(folder, safe_serialization=True)
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, folder)
    return request.param, hf, Transformer.from_pretrained(folder, "fp32"), folder


def test_logits_match_hf(pair):
    kind, hf, ours, _ = pair
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (ref - got).abs().max().item() <= 1e-5, kind


def test_rope_inv_freq_matches_hf(pair):
    kind, hf, ours, _ = pair
    ref = hf.model.rotary_emb.inv_freq
    assert torch.allclose(rope_inv_freq(ours.cfg), ref, rtol=1e-6, atol=0), kind


def test_sdpa_matches_math_path(pair):
    _, _, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        quick = fast.apply(ours, True)(ids)
        slow = fast.apply(ours, False)(ids)  # the plain model, as the other tests here use it
    assert (quick - slow).abs().max().item() <= 1e-5


def test_kv_cache_decoding_equals_full_recompute(pair):
    from model import KVCache
    _, _, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.cfg, 2, 24, "cpu", torch.float32)
        steps = [ours(ids[:, :10], cache=cache)]
        for t in range(10, 24):
            steps.append(ours(ids[:, t:t + 1], cache=cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_batched_greedy_equals_one_at_a_time(pair):
    _, _, ours, _ = pair
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    batched = generate(ours, prompts, max_new_tokens=12)
    alone = [generate(ours, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert all(len(o) == 12 for o in batched)  # no stop ids given: runs to max_new_tokens


def test_greedy_matches_hf_generate(pair):
    kind, hf, ours, _ = pair
    prompt = [5, 17, 42, 9]
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                      pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert generate(ours, [prompt], max_new_tokens=10) == [ref], kind


def test_stop_id_and_stop_string():
    torch.manual_seed(0)
    # a model whose greedy output we first observe, then ask to stop at a token it produces
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    m = Transformer(cfg).eval()
    free = generate(m, [[1, 2, 3]], max_new_tokens=8)[0]
    stop = free[3]
    first = free.index(stop)
    assert generate(m, [[1, 2, 3]], max_new_tokens=8, stop_ids=[stop])[0] == free[:first]
    decode = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    cut = generate(m, [[1, 2, 3]], max_new_tokens=8, stop_strings=[f"t{stop}"], decode=decode)[0]
    assert cut == free[:first]


def test_seeded_sampling_is_reproducible_and_top_p_restricts():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    m = Transformer(cfg).eval()
    run = lambda seed, p: generate(m, [[1, 2], [3]], 16, temperature=1.0, top_p=p,  # noqa: E731
                                   generator=torch.Generator().manual_seed(seed))
    assert run(7, 0.9) == run(7, 0.9)
    assert run(7, 1.0) != run(8, 1.0)
    # top_p tiny keeps only the most likely token: sampling becomes greedy
    assert run(7, 1e-6) == generate(m, [[1, 2], [3]], 16)


# --- loading errors: one line naming the problem -------------------------------------------------

@pytest.fixture()
def saved(tmp_path):
    make_hf("llama-untied", tmp_path)
    return tmp_path


def one_line_error(folder, match):
    with pytest.raises(ModelLoadError, match=match) as e:
        Transformer.from_pretrained(folder, "fp32")
    assert "\n" not in str(e.value)


def test_error_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    one_line_error(saved, "truncated or corrupt")


def test_error_missing_and_unexpected_tensor(saved):
    from safetensors.torch import load_file, save_file
    state = load_file(saved / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, saved / "model.safetensors")
    one_line_error(saved, "missing tensor 'model.layers.1.mlp.up_proj.weight'")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    state["model.layers.9.extra.weight"] = torch.zeros(1)
    save_file(state, saved / "model.safetensors")
    one_line_error(saved, "unexpected tensor 'model.layers.9.extra.weight'")


def test_error_wrong_shape(saved):
    from safetensors.torch import load_file, save_file
    state = load_file(saved / "model.safetensors")
    state["model.norm.weight"] = torch.ones(63)
    save_file(state, saved / "model.safetensors")
    one_line_error(saved, r"'model.norm.weight' has shape \(63,\)")


def test_error_unknown_architecture_and_missing_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    cfg["model_type"] = "gpt_neox"
    (saved / "config.json").write_text(json.dumps(cfg))
    one_line_error(saved, "unsupported architecture 'GPTNeoXForCausalLM'")
    (saved / "config.json").unlink()
    one_line_error(saved, "no config.json")


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf("qwen2", tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a = Transformer.from_pretrained(tmp_path / "one", "fp32")
    b = Transformer.from_pretrained(tmp_path / "sharded", "fp32")
    ids = torch.arange(20)[None]
    assert torch.equal(a(ids), b(ids))


def test_transformers5_rope_parameters_dialect():
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10,
         "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2,
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}}
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    d["rope_parameters"]["rope_type"] = "yarn"
    with pytest.raises(ModelLoadError, match="unsupported rope_scaling type 'yarn'"):
        ModelConfig.from_dict(d)


def test_bf16_load_close_to_fp32(saved):
    a = Transformer.from_pretrained(saved, "fp32")
    b = Transformer.from_pretrained(saved, "bf16")
    assert b.dtype == torch.bfloat16
    ids = torch.arange(30)[None]
    with torch.no_grad():
        pa, pb = a(ids).softmax(-1), b(ids).float().softmax(-1)
    assert (pa - pb).abs().max().item() < 0.05


def test_an_unusable_device_is_a_clear_error(capsys):
    from devices import usable_device
    from generation import main
    assert usable_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'nosuch'"):
        usable_device("nosuch")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU here; use --device cpu"):
            usable_device("cuda")
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):  # every CLI: one line, no traceback
            main(["--prompt", "hi", "--device", "cuda"])
