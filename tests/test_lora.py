"""lora.py: LoRA by composition, merge, adapter save/load, and parity with HF transformers + PEFT
on tiny random Llama and Qwen2 models."""

import json
import math

import pytest
import torch
import torch.nn as nn

from lora import (AdapterError, LoRAConfig, LoRALinear, count_parameters, inject_lora, load_adapter,
                  lora_layers, merge_lora, parameter_summary, save_adapter, unmerge_lora)
from model import Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

torch.set_num_threads(1)  # the machine is shared; these models are tiny anyway

VOCAB = 96
KINDS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
}


@pytest.fixture(scope="module", params=list(KINDS))
def base_folder(request, tmp_path_factory):
    cfg_cls, model_cls, extra = KINDS[request.param]
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    getattr(transformers, model_cls)(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ids(seed=1, shape=(2, 12)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def randomize_b(model, seed=3):
    """Give every lora_B nonzero values, so that the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_output_unchanged_at_init_and_a_is_peft_kaiming(base_folder):
    model = Transformer.from_pretrained(base_folder, "fp32")
    x = ids()
    with torch.no_grad():
        before = model(x)
        names = inject_lora(model, ("q_proj", "v_proj"), r=8, alpha=16, seed=0)
        after = model(x)
    assert torch.equal(before, after)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    # PEFT's A is kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); compare the range with
    # the A that PEFT itself draws for the same layer.
    pm = peft.get_peft_model(hf_model(base_folder), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    peft_A = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    ours_A = model.model.layers[0].self_attn.q_proj.lora_A
    bound = 1 / math.sqrt(ours_A.shape[1])
    assert ours_A.shape == peft_A.shape and ours_A.dtype == torch.float32
    for A in (ours_A, peft_A):
        assert 0.8 * bound < A.abs().max().item() <= bound
    assert abs(ours_A.detach().std().item() - peft_A.detach().std().item()) < 0.25 * bound
    assert not model.model.layers[0].self_attn.q_proj.lora_B.any()


def test_seed_makes_init_reproducible(base_folder):
    a = Transformer.from_pretrained(base_folder, "fp32")
    b = Transformer.from_pretrained(base_folder, "fp32")
    c = Transformer.from_pretrained(base_folder, "fp32")
    inject_lora(a, seed=5), inject_lora(b, seed=5), inject_lora(c, seed=6)
    qa, qb, qc = (m.model.layers[1].self_attn.v_proj.lora_A for m in (a, b, c))
    assert torch.equal(qa, qb) and not torch.equal(qa, qc)


def test_only_lora_trains_and_counts_match_peft(base_folder):
    model = Transformer.from_pretrained(base_folder, "fp32")
    inject_lora(model, ("q_proj", "v_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    pm = peft.get_peft_model(hf_model(base_folder), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    assert count_parameters(model) == pm.get_nb_trainable_parameters()
    assert f"{count_parameters(model)[0]:,}" in parameter_summary(model)


def test_adamw_step_changes_lora_only(base_folder):
    model = Transformer.from_pretrained(base_folder, "fp32")
    inject_lora(model, ("q_proj", "v_proj"), seed=0)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x = ids(shape=(2, 10))
    for _ in range(2):  # step 1 moves B off zero; only then does A get a gradient
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    for n, p in base_before.items():
        assert torch.equal(params[n], p), n
        assert params[n].grad is None, n
    for n, p in lora_before.items():
        assert not torch.equal(params[n], p), n


def test_merge_matches_unmerged_and_unmerge_restores(base_folder):
    model = Transformer.from_pretrained(base_folder, "fp32")
    inject_lora(model, "all-linear", seed=0)
    randomize_b(model)
    w_before = {n: m.base.weight.detach().clone() for n, m in lora_layers(model).items()}
    x = ids()
    with torch.no_grad():
        unmerged = model(x)
        model.eval()  # eval() must not merge
        assert not any(m.merged for m in lora_layers(model).values())
        merge_lora(model)
        merged = model(x)
        assert all(m.merged for m in lora_layers(model).values())
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.base.weight,
                               w_before["model.layers.0.self_attn.q_proj"])
        assert (merged - unmerged).abs().max().item() <= 1e-5
        unmerge_lora(model)
        again = model(x)
    for n, m in lora_layers(model).items():
        assert (m.base.weight - w_before[n]).abs().max().item() <= 1e-6, n
    assert (again - unmerged).abs().max().item() <= 1e-5
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8).requires_grad_(False), r=4, alpha=8, dropout=0.5)
    x = torch.randn(64, 16)
    with torch.no_grad():
        base_only = layer.base(x)
        layer.train()
        assert torch.equal(layer(x), base_only)  # B = 0: dropout inside the branch changes nothing
        layer.lora_B.normal_()
        layer.eval()
        e1, e2 = layer(x), layer(x)
        no_dropout = base_only + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scale
        assert torch.equal(e1, e2) and torch.allclose(e1, no_dropout, atol=1e-6)
        layer.train()
        t1, t2 = layer(x), layer(x)
        assert not torch.allclose(t1, e1) and not torch.allclose(t1, t2)


def test_bf16_base_keeps_fp32_lora(base_folder):
    model = Transformer.from_pretrained(base_folder, "bf16")
    inject_lora(model, ("q_proj", "v_proj"), seed=0)
    randomize_b(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert layer.base.weight.dtype == torch.bfloat16
    before = layer.base.weight.clone()
    with torch.no_grad():
        out = model(ids())
        merge_lora(model)
        merged = model(ids())
    assert out.dtype == merged.dtype == torch.bfloat16
    assert layer.base.weight.dtype == torch.bfloat16
    assert (out.float() - merged.float()).abs().max().item() < 0.1  # same function, bf16 rounding
    # the merge adds B A in fp32 and rounds once (rounding B A to bf16 first would differ)
    once = (before.float() + layer.delta_weight()).bfloat16()
    assert torch.equal(layer.base.weight, once)
    assert not torch.equal(once, before + layer.delta_weight().bfloat16())  # the two roundings differ here
    merged_weight = layer.base.weight.clone()
    unmerge_lora(model)
    assert torch.equal(layer.base.weight, (merged_weight.float() - layer.delta_weight()).bfloat16())
    scale = max(before.float().abs().max(), merged_weight.float().abs().max())
    assert (layer.base.weight.float() - before.float()).abs().max() <= scale * 2 ** -7  # two bf16 roundings


def test_save_load_round_trip(base_folder, tmp_path):
    model = Transformer.from_pretrained(base_folder, "fp32")
    config = LoRAConfig(r=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"])
    inject_lora(model, config.targets, config.r, config.alpha, config.dropout, seed=0)
    randomize_b(model)
    out = tmp_path / "adapter"
    save_adapter(model, out, config, str(base_folder))
    save_adapter(model, out, config, str(base_folder))  # overwriting an existing adapter works
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folders left
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["task_type"], saved["r"], saved["lora_alpha"], saved["bias"]) == \
        ("LORA", "CAUSAL_LM", 4, 8, "none")
    assert saved["base_model_name_or_path"] == str(base_folder)

    fresh = Transformer.from_pretrained(base_folder, "fp32")
    loaded = load_adapter(fresh, out)
    assert loaded == config
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(ids()), fresh(ids()))
    # loading again into the model that already has these LoRA layers replaces the weights
    for layer in lora_layers(fresh).values():
        layer.lora_B.data.zero_()
    with torch.no_grad():
        assert not torch.equal(model(ids()), fresh(ids()))
    assert load_adapter(fresh, out) == config
    with torch.no_grad():
        assert torch.equal(model(ids()), fresh(ids()))
    # ... but not into LoRA layers of another rank, nor into a merged model
    other = Transformer.from_pretrained(base_folder, "fp32")
    inject_lora(other, config.targets, 8, 8, 0.0, seed=0)
    with pytest.raises(AdapterError, match="already has LoRA layers that differ"):
        load_adapter(other, out)
    merge_lora(fresh)
    with pytest.raises(AdapterError, match="merged model"):
        load_adapter(fresh, out)


def test_strict_loading_names_the_tensor(base_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    model = Transformer.from_pretrained(base_folder, "fp32")
    config = LoRAConfig()
    inject_lora(model, config.targets)
    save_adapter(model, tmp_path / "a", config, "base")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    good = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def attempt(state):
        save_file(state, weights)
        return pytest.raises(AdapterError, match=key.replace(".", r"\."))

    with attempt({k: v for k, v in good.items() if k != key}):
        load_adapter(Transformer.from_pretrained(base_folder, "fp32"), tmp_path / "a")
    with attempt({**good, key: torch.zeros(3, 3)}):
        load_adapter(Transformer.from_pretrained(base_folder, "fp32"), tmp_path / "a")
    extra = key.replace("v_proj", "k_proj")
    state = {**good, extra: good[key].clone()}
    save_file(state, weights)
    with pytest.raises(AdapterError, match=extra.replace(".", r"\.")):
        load_adapter(Transformer.from_pretrained(base_folder, "fp32"), tmp_path / "a")


@pytest.mark.parametrize("key,value", [("use_dora", True), ("peft_type", "IA3"), ("bias", "all"),
                                       ("rank_pattern", {"q_proj": 4}), ("modules_to_save", ["lm_head"])])
def test_unsupported_adapter_config_is_refused(base_folder, tmp_path, key, value):
    model = Transformer.from_pretrained(base_folder, "fp32")
    inject_lora(model)
    save_adapter(model, tmp_path / "a", LoRAConfig(), "base")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(AdapterError, match=key):
        load_adapter(Transformer.from_pretrained(base_folder, "fp32"), tmp_path / "a")


def test_no_matching_target_fails(base_folder):
    model = Transformer.from_pretrained(base_folder, "fp32")
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        inject_lora(model, ["query_key_value"])


def test_tied_head_is_refused_and_model_left_intact(base_folder):
    model = Transformer.from_pretrained(base_folder, "fp32")
    if not model.cfg.tie_word_embeddings:
        names = inject_lora(model, ["q_proj", "lm_head"])  # an untied head is an ordinary linear
        assert names[-1] == "lm_head" and isinstance(model.lm_head, LoRALinear)
        return
    with pytest.raises(ValueError, match="lm_head.*tied"):
        inject_lora(model, ["q_proj", "lm_head"])
    assert not lora_layers(model)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_peft_loads_our_adapter_with_same_logits(base_folder, tmp_path, targets):
    model = Transformer.from_pretrained(base_folder, "fp32")
    config = LoRAConfig(targets=targets)
    names = inject_lora(model, config.targets, config.r, config.alpha, seed=0)
    randomize_b(model)
    save_adapter(model, tmp_path / "ours", config, str(base_folder))
    pm = peft.PeftModel.from_pretrained(hf_model(base_folder), tmp_path / "ours").eval()
    peft_names = [n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert sorted(peft_names) == sorted(names)  # all-linear selects the same modules as PEFT's
    with torch.no_grad():
        ref = pm(ids()).logits
        got = model.eval()(ids())
    assert (ref - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_peft_adapter_loads_into_ours_with_same_logits(base_folder, tmp_path, targets):
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf_model(base_folder), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "peft")
    model = Transformer.from_pretrained(base_folder, "fp32")
    config = load_adapter(model, tmp_path / "peft")
    assert (config.r, config.alpha, config.dropout) == (8, 16, 0.0)
    peft_names = [n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert sorted(lora_layers(model)) == sorted(peft_names)
    with torch.no_grad():
        ref = pm.eval()(ids()).logits
        got = model.eval()(ids())
    assert (ref - got).abs().max().item() <= 1e-5
