"""bench.py's bookkeeping: the FLOP counts behind its %-of-peak column, and the batching it times.

Speed itself is never asserted (it depends on the machine); these check that the work bench.py
claims to measure is the work it counts.
"""

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import model as model_mod
from data import Rendered, collate
from model import ModelConfig, Transformer
from perplexity import response_nll


def tiny_folder(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_forward_flops_match_torch_flop_counter(tmp_path, monkeypatch):
    """Linear + head FLOPs equal what torch counts for the matrix products of response_nll; the
    attention count is torch's full T x T count scaled to the causal half bench.py uses."""
    # torch's counter has no formula for oneDNN's product on a laid-out weight copy (the same
    # products, another kernel), so the layers take F.linear here.
    monkeypatch.setattr(model_mod.Linear, "onednn_copy_rows", {})
    folder = tiny_folder(tmp_path)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_json(folder / "config.json")).eval()
    model.attn_impl = "math"  # torch's counter sees its matmuls (not CPU SDPA's fused kernel)
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
