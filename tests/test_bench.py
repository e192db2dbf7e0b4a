"""bench.py's bookkeeping: the FLOP counts behind its %-of-peak column, and the batching it times.

Speed itself is never asserted (it depends on the machine); these check that the work bench.py
claims to measure is the work it counts.
"""

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
from data import Rendered, collate
from model import ModelConfig, Transformer
from nll import response_nll


def tiny_folder(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_forward_flops_match_torch_flop_counter(tmp_path):
    """Linear + head FLOPs equal what torch counts for the matrix products of response_nll; the
    attention count is torch's full T x T count scaled to the causal half bench.py uses."""
    folder = tiny_folder(tmp_path)
    torch.manual_seed(0)
    # The plain model (fast.apply not called): torch's counter sees its attention matmuls (not
    # CPU SDPA's fused kernel) and its F.linear products (it has no formula for oneDNN's product
    # on a laid-out weight copy).
    model = Transformer(ModelConfig.from_json(folder / "config.json")).eval()
    lengths = [23, 17, 9]
    g = torch.Generator().manual_seed(1)
    items = [Rendered(torch.randint(1, 96, (n,), generator=g).tolist(), [0] * (n // 2) + [1] * (n - n // 2))
             for n in lengths]
    shape = bench.read_shape(folder)
    linear, attn = 0, 0
    for r in items:  # one row at a time: no padding, so the counted work is the real work
        batch = collate([r], pad_id=0)
        targets = int(batch.target_mask[:, 1:].sum())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            response_nll(model, batch)
        counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        attn_counted = counts["aten.bmm"]  # QK^T and PV over the full T x T square
        lin, att = bench.forward_flops(shape, [len(r.ids)], targets)
        T = len(r.ids)
        assert counts["aten.mm"] + counts.get("aten.addmm", 0) == lin
        assert attn_counted > 0
        assert attn_counted * (T + 1) / (2 * T) == att
        linear, attn = linear + lin, attn + att
    assert bench.row_flops("ppl", shape, lengths, sum(sum(r.mask[1:]) for r in items)) == linear + attn


def test_work_batches_cover_the_first_n_pairs_once_grouped_by_length():
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(5, 60, (37,), generator=g).tolist()
    rendered = [Rendered(list(range(1, n + 1)), [0] * (n - 2) + [1, 1]) for n in lengths]
    batches = bench.work_batches(rendered, 32, 8, pad_id=0)
    assert all(b.input_ids.shape[0] <= 8 for b in batches)
    got = sorted(int(n) for b in batches for n in b.lengths)
    assert got == sorted(lengths[:32])  # the first 32, each once; none of the other 5
    padded = sum(b.input_ids.numel() for b in batches)
    in_order = sum(8 * max(lengths[i:i + 8]) for i in range(0, 32, 8))
    assert padded <= in_order  # grouping by length never pads more than taking them in order


def test_step_budget_and_decode_lines_follow_the_timings():
    """What 8x batch 1 leaves each decoding step: batch 1 at 40 tok/s, 16 rows of 200 tokens
    -> 3,200 tokens in 3200 / (8 * 40) = 10 s; minus a 3 s prefill, over 199 steps."""
    row_s, step_s = bench.step_budget(40.0, 16, 200, 3.0, 8)
    assert abs(row_s - 10.0) < 1e-12 and abs(step_s - 7.0 / 199) < 1e-12
    assert bench.step_budget(40.0, 16, 200, 12.0, 8)[1] < 0  # a prefill longer than the whole budget
    results = [
        {"impl": "ours", "dtype": "fp32", "row": "gen@1", "tokens_per_s": 40.0, "median_s": 5.0,
         "prefill_s": 0.2, "products_per_step_s": 0.02},
        {"impl": "ours", "dtype": "fp32", "row": "gen@16", "tokens_per_s": 160.0, "median_s": 20.0,
         "prefill_s": 3.0, "products_per_step_s": 0.041},
        {"impl": "hf", "dtype": "fp32", "row": "gen@16", "tokens_per_s": 100.0, "median_s": 32.0},
    ]
    lines = bench.decode_lines(results, 200)
    assert len(lines) == 3  # two rows taken apart (ours only), one budget line
    assert "decoding steps of 85.4 ms" in lines[1]  # (20 - 3) / 199 s
    assert "10.00 s in all (measured 20.00 s): 35.2 ms per decoding step" in lines[2]
    assert "41.0 ms for a step's products alone" in lines[2]
    results[1]["prefill_s"] = 12.0
    assert "less than its prefill alone takes" in bench.decode_lines(results, 200)[2]


def test_decode_breakdown_times_the_prefill_and_every_linear(tmp_path, monkeypatch):
    """decode_breakdown runs generation.prefill on the prompts and calls every Linear (head included)
    once per timed pass on a (B, 1, in) input."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_json(tiny_folder(tmp_path) / "config.json")
    model = Transformer(cfg).eval()
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    out = bench.decode_breakdown(model, prompts, new_tokens=4, pad_id=0, repeats=1, device="cpu")
    assert out["prefill_s"] > 0 and out["products_per_step_s"] > 0
    n_linears = 7 * cfg.num_hidden_layers + 1
    one_token = [s for s in seen if s[:2] == (2, 1)]
    assert len(one_token) == n_linears * 7  # (2 warm-up + 5 timed passes) of every Linear
    prompt_passes = [s for s in seen if s[:2] == (2, 5)]  # both prompts, left-padded to 5 tokens
    assert len(prompt_passes) == 7 * cfg.num_hidden_layers * 2  # each layer's 7 Linears, warm-up + 1 timed
    assert {s[2] for s in one_token} == {cfg.hidden_size, cfg.intermediate_size}
