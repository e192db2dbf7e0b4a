"""Every fast path (fast.py, and generation's / perplexity.py's own) gives the same answer as its plain path.

Correctness only, never speed (bench.py measures speed). The fast paths checked:
- SDPA attention vs the textbook math path (`fast.apply(model, False)`), plain causal, with a KV
  cache (several new tokens against cached ones) and with a left-padding mask;
- the one-token CPU decode path (grouped_attention against the cache, no K/V copies per head)
  vs SDPA with explicitly repeated K/V, and generation's cached, left-padded, row-compacting loop
  vs recomputing each prompt + continuation from scratch; the CPU's grouped, less padded prefill
  vs one left-padded call;
- block_causal_attention (bf16 CPU training) vs the textbook path, values and gradients, and a
  bf16 LoRA step's gradients with it vs with SDPA;
- bf16 CPU decoding reading the whole KV cache vs in blocks of 64 positions (same tokens);
- one sequence decoding on CPU (SDPA in fp32 over exactly the cached positions) vs the batch path,
  including a left-padded row left alone after its batch-mate stopped;
- fast.Linear's products on W's oneDNN copy (decoding steps without a gradient, fp32 2-64 rows,
  bf16 3-64), its fp32 products for one row (W as two halves) and a few rows (W @ x^T), and its
  bf16 products of 1-2 rows without oneDNN, vs F.linear, alone and through whole generations at
  batch 1, 2 and 6; when the copy is used (only batched decoding), remade and freed;
- greedy picks on widened bf16 logits vs bf16's own argmax (ties included);
- top-p sampling through the top-256 shortcut vs a full-sort nucleus written here, including a
  nucleus that needs more than 256 tokens;
- response_nll's head-only-on-supervised-positions (chunked, padding dropped) vs cross entropy on
  full padded logits; packed hidden states and LoRA gradients (fast.Packing) vs the padded batch;
- bf16 perplexity vs fp32 on the real SmolLM2-135M and real GSM8K pairs (within 1%).
"""

import pytest
import torch
import torch.nn.functional as F

import fast
import generation
from data import Batch, Rendered
from generation import generate, sample_next
from model import KVCache, ModelConfig, Transformer, grouped_attention
from nll import response_nll

VOCAB = 96


def tiny_model(n_kv=2, seed=0, **kw) -> Transformer:
    """A random 2-layer Llama with GQA (4 query heads over n_kv kv heads), fp32, fast paths on."""
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=256,
                      rope_theta=10000.0, **kw)
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    m.requires_grad_(False)
    return fast.apply(m, True)


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def tiny(request):
    return tiny_model(n_kv=request.param)


def run_both(m, fn):
    """fn() with the fast paths (SDPA) and with the plain model (the math path)."""
    fast.apply(m, True)
    quick = fn()
    fast.apply(m, False)
    try:
        slow = fn()
    finally:
        fast.apply(m, True)
    return quick, slow


def test_apply_swaps_classes_only_and_ilb_plain_turns_it_off(monkeypatch):
    """fast.apply swaps the classes of the model, its attention modules and its nn.Linears in
    place: the same parameters under the same state-dict keys; on=False, or ILB_PLAIN=1 in the
    environment, leaves the plain model.py classes."""
    import model
    m = tiny_model()
    keys = {k: v.data_ptr() for k, v in m.state_dict().items()}
    assert type(m) is fast.Transformer and type(m.lm_head) is fast.Linear
    assert all(type(layer.self_attn) is fast.Attention for layer in m.model.layers)
    for on, env in ((False, ""), (None, "1"), (None, "0"), (None, "")):
        monkeypatch.setenv("ILB_PLAIN", env)
        fast.apply(m, False)
        assert fast.apply(m, on) is m
        plain = on is False or env == "1"
        assert (type(m) is model.Transformer) == plain and (type(m) is fast.Transformer) == (not plain)
        assert {type(x) for x in m.modules() if isinstance(x, torch.nn.Linear)} == {torch.nn.Linear if plain else fast.Linear}
        assert {k: v.data_ptr() for k, v in m.state_dict().items()} == keys


def ids_of(shape, seed):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def close_to(out, ref, dtype) -> bool:
    """Equal up to rounding: 1e-5 of ref's largest entry in fp32, 2e-2 in bf16."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return (out.detach().float() - ref.float()).abs().max().item() <= tol * ref.float().abs().max().item()


# ----------------------------------------------------------------------------------------------
# SDPA vs math


@torch.no_grad()
def test_sdpa_equals_math_causal(tiny):
    ids = ids_of((3, 37), 1)
    quick, slow = run_both(tiny, lambda: tiny(ids))
    assert (quick - slow).abs().max().item() <= 1e-5


@torch.no_grad()
def test_sdpa_equals_math_with_kv_cache(tiny):
    """Prefill 11 tokens, then chunks of 5 and 4 against the cache: SDPA runs with the cache mask
    (T > 1 keeps the SDPA path on CPU), math the textbook way; both equal the full forward."""
    ids = ids_of((2, 20), 2)

    def chunked():
        cache = KVCache(tiny.cfg, 2, 20, "cpu", torch.float32)
        return torch.cat([tiny(ids[:, a:b], cache=cache) for a, b in ((0, 11), (11, 16), (16, 20))], 1)

    quick, slow = run_both(tiny, chunked)
    full = tiny(ids)
    assert (quick - slow).abs().max().item() <= 1e-5
    assert (quick - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_sdpa_equals_math_with_left_padding_mask(tiny):
    """The mask generate() builds for left padding; real rows equal the unpadded sequence alone."""
    lengths = [13, 6, 9]
    P = max(lengths)
    seqs = [ids_of((n,), 10 + i)[0:n] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(lengths), P, dtype=torch.long)
    valid = torch.zeros(len(lengths), P, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, P - len(s):] = s
        valid[b, P - len(s):] = True
    L = torch.tensor(lengths)
    positions = (torch.arange(P)[None] - (P - L)[:, None]).clamp(min=0)
    mask = torch.ones(P, P, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    mask = mask | torch.eye(P, dtype=torch.bool)[None, None]
    quick, slow = run_both(tiny, lambda: tiny(ids, positions, mask))
    real = valid[:, :, None].expand_as(quick)
    assert (quick - slow)[real].abs().max().item() <= 1e-5
    for b, s in enumerate(seqs):
        alone = tiny(s[None])[0]
        assert (quick[b, P - len(s):] - alone).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------
# One-token decoding


def test_grouped_attention_one_token_equals_sdpa_with_repeated_kv():
    """The CPU decode kernel (query rows of a group stacked, no K/V copy) vs SDPA on K/V repeated
    per head, HF's layout (query head h uses kv head h // groups), with a padding mask."""
    g = torch.Generator().manual_seed(5)
    B, H, n_kv, S, hd = 3, 6, 2, 17, 16
    q = torch.randn(B, H, 1, hd, generator=g)
    k, v = torch.randn(B, n_kv, S, hd, generator=g), torch.randn(B, n_kv, S, hd, generator=g)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., :5] = False  # left padding of row 0
    mask[2, ..., :2] = False
    got = grouped_attention(q, k, v, mask)
    rep = H // n_kv
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         attn_mask=mask)
    assert got.shape == (B, H, 1, hd)
    assert (got - ref).abs().max().item() <= 1e-5


@torch.no_grad()
def test_one_token_decode_equals_full_recompute(tiny):
    ids = ids_of((2, 26), 3)
    cache = KVCache(tiny.cfg, 2, 26, "cpu", torch.float32)
    steps = [tiny(ids[:, :8], cache=cache)]
    steps += [tiny(ids[:, t:t + 1], cache=cache) for t in range(8, 26)]  # T == 1: the decode path
    assert (torch.cat(steps, 1) - tiny(ids)).abs().max().item() <= 1e-5


def test_generate_logits_equal_recompute_from_scratch(tiny, monkeypatch):
    """Inside generate(): left padding, the KV cache, one-token decoding and dropping finished rows
    from the batch. Every step's logits equal a fresh, unpadded, uncached math-path forward."""
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (9, 3, 14, 6)]
    plain = generate(tiny, prompts, max_new_tokens=8)
    # a stop id that ends row 1 early (its 3rd token) while other rows go on: exercises compaction
    stop = plain[1][2]
    seen = []
    real_sample = generation.sample_next

    def spy(logits, *a, **kw):
        seen.append(logits.clone())
        return real_sample(logits, *a, **kw)

    monkeypatch.setattr(generation, "sample_next", spy)
    out = generate(tiny, prompts, max_new_tokens=8, stop_ids=[stop])
    monkeypatch.undo()
    assert len(out[1]) < 8 and any(len(o) == 8 for o in out)  # rows did finish at different steps

    fast.apply(tiny, False)
    try:
        active = list(range(len(prompts)))
        done = [False] * len(prompts)
        for step, logits in enumerate(seen):
            assert logits.shape[0] == len(active)
            for row, b in enumerate(active):
                seq = prompts[b] + out[b][:step]
                with torch.no_grad():
                    ref = tiny(torch.tensor([seq]))[0, -1]
                assert (logits[row] - ref).abs().max().item() <= 1e-4, (step, b)
                if step >= len(out[b]):  # this step produced the stop id (or hit the end)
                    done[b] = True
            active = [b for b in active if not done[b]]
    finally:
        fast.apply(tiny, True)
    # and a row's tokens do not depend on its batch-mates
    assert out == [generate(tiny, [p], max_new_tokens=8, stop_ids=[stop])[0] for p in prompts]


@torch.no_grad()
def test_grouped_prefill_equals_one_padded_call(tiny):
    """The CPU prefill (sorted groups of 4, each padded to its own longest, keys/values copied into
    the batch cache) leaves the same cache and last hidden states as one left-padded call."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (9, 3, 14, 6, 11, 2, 14)]
    P = max(len(p) for p in prompts)
    caches, lasts = [], []
    for group_size in (4, len(prompts)):
        cache = KVCache(tiny.cfg, len(prompts), P + 2, "cpu", torch.float32)
        lasts.append(generation.prefill(tiny, prompts, cache, group_size=group_size))
        assert cache.length == P
        caches.append(cache)
    assert (lasts[0] - lasts[1]).abs().max().item() <= 1e-5
    for b, p in enumerate(prompts):  # real positions only; padding slots are masked out anyway
        for layer in range(tiny.cfg.num_hidden_layers):
            for kv in ("k", "v"):
                a, c = (getattr(x, kv)[layer][b, :, P - len(p):P] for x in caches)
                assert (a - c).abs().max().item() <= 1e-5


@pytest.mark.parametrize("T,block", [(1, 4), (5, 4), (8, 4), (13, 4), (37, 128)])
@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_block_causal_attention_equals_textbook(T, block, n_kv):
    """Output and q/k/v gradients of the block-wise causal attention equal grouped_attention's
    (plain causal softmax over the whole T x T scores), for T a multiple of the block or not."""
    torch.manual_seed(T * 10 + n_kv)
    q = torch.randn(2, 4, T, 8, requires_grad=True)
    k = torch.randn(2, n_kv, T, 8, requires_grad=True)
    v = torch.randn(2, n_kv, T, 8, requires_grad=True)
    go = torch.randn(2, 4, T, 8)
    grads = []
    for fn in (lambda: fast.block_causal_attention(q, k, v, block=block), lambda: grouped_attention(q, k, v, None)):
        y = fn()
        grads.append([y] + list(torch.autograd.grad(y, (q, k, v), go)))
    for a, b in zip(*grads):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5


def test_bf16_lora_step_block_attention_equals_sdpa(monkeypatch):
    """A bf16 LoRA forward + backward on CPU takes the block path; its loss and LoRA gradients match
    the same step through SDPA within bf16 rounding."""
    from lora import inject_lora
    m = tiny_model().to(torch.bfloat16)
    inject_lora(m, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0, seed=0)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 at init would make A's gradient zero
    ids = torch.randint(1, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    calls = []
    real = fast.block_causal_attention
    monkeypatch.setattr(fast, "block_causal_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for blocks in (True, False):
        monkeypatch.setattr(fast, "BF16_TRAINING_BLOCKS", blocks)
        m.zero_grad()
        loss = F.cross_entropy(m(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        results.append((loss.item(), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.requires_grad}))
    assert len(calls) == m.cfg.num_hidden_layers  # the first pass used the block path in every layer
    (loss_a, ga), (loss_b, gb) = results
    assert abs(loss_a - loss_b) <= 1e-2 * abs(loss_b)
    for n in ga:
        scale = gb[n].abs().max().item()
        assert scale > 0 and (ga[n] - gb[n]).abs().max().item() <= 0.05 * scale, n


def spy_decoding(monkeypatch):
    """Lists filled in as generate() runs: every read of the KV cache (fast.read_cache: rows,
    positions it returns, positions filled once the new keys are written, the cache's max_len),
    and every step's logits (fp32) that a token is sampled from."""
    reads, logits = [], []
    real_read, real_sample = fast.read_cache, generation.sample_next

    def read(cache, layer, k, v, mask):
        out = real_read(cache, layer, k, v, mask)
        reads.append((out[0].shape[0], out[0].shape[2], cache.length + k.shape[2], cache.max_len))
        return out
    monkeypatch.setattr(fast, "read_cache", read)
    monkeypatch.setattr(generation, "sample_next", lambda lg, *a: logits.append(lg.float()) or real_sample(lg, *a))
    return reads, logits


def test_bf16_decoding_whole_cache_reads_equal_block_reads(monkeypatch):
    """bf16 CPU decoding reads the whole preallocated cache (masked); reading it in blocks of 64
    positions instead gives the same logits at every step (within bf16 rounding) and the same
    greedy tokens: the masked, never-written positions contribute nothing."""
    m = tiny_model(n_kv=2, seed=4).to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 50, 12, 1)]
    reads, logits = spy_decoding(monkeypatch)
    outs, steps = [], []
    for whole in (True, False):
        monkeypatch.setattr(fast, "WHOLE_CACHE_READS_BF16", whole)
        reads.clear()
        logits.clear()
        outs.append(generate(m, prompts, max_new_tokens=30))
        steps.append(torch.stack(logits))  # (30, B, vocab)
        one_token_reads = [n for _, n, _, _ in reads[m.cfg.num_hidden_layers:]]  # after the prefill (one group of 4)
        assert set(one_token_reads) == ({50 + 30} if whole else {64, 50 + 30})  # blocks: 64, then the cache's end
    assert outs[0] == outs[1] and all(len(o) == 30 for o in outs[0])
    assert (steps[0] - steps[1]).abs().max().item() <= 2e-2 * steps[1].abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_sequence_decoding_sdpa_equals_grouped_attention(dtype, monkeypatch):
    """One sequence decoding on CPU: SDPA in fp32 over exactly the filled cache positions vs the
    batch path (grouped_attention over blocks of 64 / the whole cache). Two prompts, the long one
    stopped after its first token, so the short, left-padded one decodes alone with its padding
    masked: every step's logits agree, as do the tokens. Alone it reads exactly S positions, in
    bf16 only up to the key limit (lowered to 40 here: whole-cache reads after it)."""
    m = tiny_model(n_kv=2, seed=7).to(dtype)
    monkeypatch.setattr(fast, "ONE_SEQUENCE_SDPA_MAX_KEYS_BF16", 40)
    g = torch.Generator().manual_seed(8)
    short, long = (torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (4, 30))
    stop = generate(m, [long], max_new_tokens=1)[0][0]
    reads, logits = spy_decoding(monkeypatch)
    outs, per_path = [], []
    for on in (True, False):
        monkeypatch.setattr(fast, "ONE_SEQUENCE_SDPA", on)
        reads.clear()
        logits.clear()
        outs.append(generate(m, [short, long], max_new_tokens=20, stop_ids=[stop]))
        per_path.append([lg[0] for lg in logits])  # row 0 is the short prompt throughout
        alone = [(n, S, max_len) for rows, n, S, max_len in reads if rows == 1]
        assert len(alone) == 19 * m.cfg.num_hidden_layers  # 19 one-row steps, every layer
        for n, S, max_len in alone:  # S = the positions filled once this step's key is written
            whole = max_len if dtype == torch.bfloat16 else min(max_len, -(-S // 64) * 64)
            exact = on and (dtype == torch.float32 or S <= 40)
            assert n == (S if exact else whole), (on, n, S)
        if on and dtype == torch.bfloat16:  # both sides of the key limit were decoded
            assert {S <= 40 for _, S, _ in alone} == {True, False}
    assert outs[0] == outs[1] and len(outs[0][1]) == 0 and len(outs[0][0]) == 20
    quick, plain = torch.stack(per_path[0]), torch.stack(per_path[1])
    assert close_to(quick, plain, dtype)


@pytest.mark.parametrize("rows", [1, 2, 16, 64, 65])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_few_rows_equals_f_linear(rows, bias, monkeypatch):
    """1 fp32 row on CPU (W as two halves: one batched product) and 2..64 rows ((W @ x^T)^T) are
    x @ W^T + b up to float rounding; 65 rows (outside the range) take F.linear itself, so must
    match bit for bit."""
    torch.manual_seed(rows)
    layer = fast.Linear(96, 160, bias=bias)
    if bias:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(rows, 1, 96)  # a decoding step's shape: (B, 1, in)
    monkeypatch.setattr(fast, "ONEDNN_COPY_ROWS", {})  # tested on its own below
    monkeypatch.setattr(fast, "ONE_ROW_HALVES", True)  # (on by default on AVX2 CPUs only)
    bmm_calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: bmm_calls.append(a[0].shape) or real_bmm(*a))
    out = layer(x)
    monkeypatch.undo()
    ref = F.linear(x, layer.weight, layer.bias)
    assert out.shape == ref.shape == (rows, 1, 160)
    assert bmm_calls == ([(2, 80, 96)] if rows == 1 else [])  # the halves path ran, and only for 1 row
    if rows <= 64:
        assert (out - ref).abs().max().item() <= 1e-5
    else:
        assert torch.equal(out, ref)


def test_linear_one_row_halves_keep_the_output_order(monkeypatch):
    """The two halves are W's first and second out/2 rows: each output lands where F.linear puts
    it (a weight with one non-zero row per output shows a swap or a shuffle exactly); an odd
    out_features cannot be halved and takes F.linear, bit for bit."""
    monkeypatch.setattr(fast, "ONE_ROW_HALVES", True)
    layer = fast.Linear(8, 6, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        for o in range(6):
            layer.weight[o, o] = o + 1.0  # output o = (o + 1) * x[o]
    x = torch.arange(1.0, 9.0)[None, None]  # (1, 1, 8)
    assert layer(x).flatten().tolist() == [(o + 1) * (o + 1.0) for o in range(6)]
    odd = fast.Linear(8, 5, bias=True)
    assert torch.equal(odd(x), F.linear(x, odd.weight, odd.bias))


def test_linear_few_rows_path_is_fp32_cpu_only():
    """bf16 products never take the transposed path (it is slower there): bit-equal to F.linear."""
    layer = fast.Linear(96, 160, bias=True).to(torch.bfloat16)
    x = torch.randn(16, 1, 96, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_linear_bf16_few_rows_without_onednn_equals_onednn(rows, monkeypatch):
    """1-2 bf16 rows on CPU run with oneDNN switched off (torch's own vector kernel): equal to
    the oneDNN product up to bf16 rounding; 3 rows keep oneDNN, bit for bit. The switch is off
    during the product (seen from inside F.linear) and back as it was afterwards, also when the
    product raises."""
    torch.manual_seed(rows)
    layer = fast.Linear(96, 160, bias=True).to(torch.bfloat16)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(rows, 1, 96, dtype=torch.bfloat16)
    before = torch.backends.mkldnn.enabled
    assert before  # oneDNN is on by default, so switching it off is a visible change
    seen = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: seen.append(torch.backends.mkldnn.enabled) or real_linear(*a))
    out = layer(x)
    with pytest.raises(RuntimeError):
        layer(torch.randn(1, 1, 95, dtype=torch.bfloat16))  # wrong width: the product raises
    monkeypatch.undo()
    assert seen == [rows > 2, False]  # off for 1-2 rows, on for 3; the failing call is 1 row
    assert torch.backends.mkldnn.enabled == before
    ref = F.linear(x, layer.weight, layer.bias)
    if rows <= 2:
        assert close_to(out, ref, torch.bfloat16)
    else:
        assert torch.equal(out, ref)


def test_linear_bf16_one_row_with_frozen_backend_flags(monkeypatch):
    """After torch.backends.disable_global_flags() the switch cannot be flipped: one bf16 row
    then takes oneDNN's product (bit for bit) instead of raising."""
    layer = fast.Linear(96, 160, bias=False).to(torch.bfloat16)
    x = torch.randn(1, 1, 96, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.backends, "flags_frozen", lambda: True)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def onednn_calls(monkeypatch) -> list:
    """Records each oneDNN product on a laid-out copy (the op fast.Linear calls)."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    return calls


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 2), (torch.float32, 16), (torch.float32, 64),
                                        (torch.bfloat16, 3), (torch.bfloat16, 16), (torch.bfloat16, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_onednn_copy_equals_f_linear(dtype, rows, bias, monkeypatch):
    """A decoding step without gradients, (B, 1, in) with B 2-64 in fp32 and 3-64 in bf16,
    multiplies by W's oneDNN copy: equal to F.linear up to rounding (bias included), in the
    input's shape; the copy is made once and reused by later steps."""
    torch.manual_seed(rows)
    layer = fast.Linear(96, 160, bias=bias).to(dtype).requires_grad_(False)
    if bias:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(rows, 1, 96).to(dtype)  # (B, 1, in): one new token per row
    least = 2 if dtype == torch.float32 else 3
    calls = onednn_calls(monkeypatch)
    with torch.no_grad():
        out, again = layer(x), layer(x[:least])
    copy = layer.onednn_weight()
    monkeypatch.undo()
    assert calls == [(rows, 96), (least, 96)]
    assert copy is layer._onednn_copy[2] and copy is layer.onednn_weight()  # made once, kept
    ref = F.linear(x, layer.weight, layer.bias)
    assert out.shape == ref.shape == (rows, 1, 160) and out.dtype == dtype and close_to(out, ref, dtype)
    assert torch.equal(again, out[:least])


@pytest.mark.parametrize("case", ["grad-enabled-trainable-W", "trainable-W-under-no-grad", "input-needs-grad",
                                  "too-few-rows-fp32",
                                  "too-few-rows-bf16", "too-many-rows", "prompt-shaped", "2d-input",
                                  "fp16", "autocast", "inference-mode-weights", "onednn-switched-off",
                                  "over-budget"])
def test_linear_onednn_copy_only_where_it_applies(case, monkeypatch):
    """Products that need a gradient (the copy has no backward), trainable weights even without a
    gradient (a fused optimizer's step does not bump the version), fp32 rows below 2, bf16 below 3,
    more than 64 rows, several tokens per row (prompts, scoring: they would make a copy of every
    weight for ~10%), 2-D inputs (packed scoring, the head on a prompt's last positions), other
    dtypes, CPU autocast (the op would not follow it), weights made under inference_mode (no
    version counter), oneDNN switched off by the user, and layers past the memory budget all
    take the other paths, make no copy, and give F.linear's result."""
    dtype = {"too-few-rows-bf16": torch.bfloat16, "fp16": torch.float16}.get(case, torch.float32)
    shape = {"too-few-rows-fp32": (1, 1, 96), "too-few-rows-bf16": (2, 1, 96), "too-many-rows": (65, 1, 96),
             "prompt-shaped": (2, 8, 96), "2d-input": (8, 96)}.get(case, (8, 1, 96))
    with torch.inference_mode(case == "inference-mode-weights"):
        layer = fast.Linear(96, 160, bias=True).to(dtype)
    layer.requires_grad_(case in ("grad-enabled-trainable-W", "trainable-W-under-no-grad"))
    x = torch.randn(shape).to(dtype).requires_grad_(case == "input-needs-grad")
    if case == "onednn-switched-off":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    if case == "over-budget":
        monkeypatch.setattr(fast, "ONEDNN_COPY_BUDGET_BYTES", fast._onednn_copy_bytes[0])
    calls = onednn_calls(monkeypatch)
    with torch.set_grad_enabled(case in ("grad-enabled-trainable-W", "input-needs-grad")), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = layer(x)
        ref = F.linear(x.detach(), layer.weight.detach(), layer.bias.detach())
    assert calls == [] and layer._onednn_copy is None
    assert out.dtype == ref.dtype and close_to(out, ref, ref.dtype)
    if out.requires_grad:  # and its gradient is F.linear's
        out.sum().backward()
        grad = x.grad if case == "input-needs-grad" else layer.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_linear_onednn_copy_not_made_for_mixed_dtypes():
    """fp32 rows into a bf16 layer raise as F.linear does, without making a copy first."""
    layer = fast.Linear(96, 160, bias=False).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad(), pytest.raises(RuntimeError):
        layer(torch.randn(8, 1, 96))
    assert layer._onednn_copy is None


def test_linear_onednn_copy_follows_changes_to_the_weight():
    """The copy is remade when W changes: in place under no_grad (as LoRA's merge and
    load_state_dict write), when the parameter is replaced, and it is dropped by .to(), also a
    round trip fp32 -> bf16 -> fp32 with no product in between (the new storage may reuse the
    old address, and .to() does not bump the version)."""
    torch.manual_seed(0)
    layer = fast.Linear(96, 160, bias=False).requires_grad_(False)
    x = torch.randn(8, 1, 96)
    copies = []

    def check():
        with torch.no_grad():
            out = layer(x.to(layer.weight.dtype))
        assert close_to(out, F.linear(x.to(layer.weight.dtype), layer.weight), layer.weight.dtype)
        assert all(layer._onednn_copy[2] is not c for c in copies)  # a new copy every time
        copies.append(layer._onednn_copy[2])

    check()
    with torch.no_grad():
        layer.weight.mul_(-2.0)
    check()
    layer.load_state_dict({"weight": torch.randn(160, 96)})
    check()
    layer.weight = torch.nn.Parameter(torch.randn(160, 96), requires_grad=False)
    check()
    layer.to(torch.bfloat16)
    assert layer._onednn_copy is None
    check()
    layer.to(torch.float32)
    assert layer._onednn_copy is None
    check()


def test_linear_onednn_copies_count_against_the_budget_and_are_freed(monkeypatch):
    """Each copy adds W's bytes to the process-wide count; a layer whose copy would pass the
    budget takes the other paths; a freed layer gives its bytes back; copying the model (deepcopy,
    pickle) leaves the oneDNN copy behind (it cannot be copied) and the copy is made again there."""
    import copy
    import gc
    import pickle

    gc.collect()  # earlier tests' layers give their bytes back now, not during this test
    before = fast._onednn_copy_bytes[0]
    a, b = (fast.Linear(96, 160, bias=False).requires_grad_(False) for _ in range(2))
    monkeypatch.setattr(fast, "ONEDNN_COPY_BUDGET_BYTES", before + 160 * 96 * 4)  # room for one
    x = torch.randn(4, 1, 96)
    with torch.no_grad():
        a(x), b(x)
    assert a._onednn_copy is not None and b._onednn_copy is None
    assert fast._onednn_copy_bytes[0] == before + 160 * 96 * 4
    for twin in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert twin._onednn_copy is None and torch.equal(twin.weight, a.weight)
    del a
    assert fast._onednn_copy_bytes[0] == before
    with torch.no_grad():
        b(x)  # now there is room
    assert b._onednn_copy is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_only_batched_decoding_makes_onednn_copies(dtype):
    """Across the model: scoring (perplexity, the options of a multiple-choice question) and a
    batch-1 generation make no copy; a batch-4 generation makes one for every layer and the head
    (the tied embedding is copied once, as the head)."""
    from perplexity import shared_prefix_nlls

    m = tiny_model(n_kv=2, seed=4).to(dtype)
    linears = [mod for mod in m.modules() if isinstance(mod, fast.Linear)]
    g = torch.Generator().manual_seed(5)
    lengths = [12, 7, 9]
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    target = torch.zeros(3, 12, dtype=torch.bool)
    for r, n in enumerate(lengths):
        ids[r, n:] = 0
        target[r, n // 2:n] = True
    with torch.no_grad():
        response_nll(m, Batch(ids, target, torch.tensor(lengths)))
    shared_prefix_nlls(m, [Rendered(ids[0, :9].tolist(), [0] * 5 + [1] * 4),
                           Rendered(ids[0, :5].tolist() + ids[1, :4].tolist(), [0] * 5 + [1] * 4)], pad_id=0)
    generate(m, [ids[0, :5].tolist()], max_new_tokens=4)
    assert all(lin._onednn_copy is None for lin in linears)
    generate(m, [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3, 7)], max_new_tokens=4)
    assert all(lin._onednn_copy is not None for lin in linears)


@pytest.mark.parametrize("lengths", [(5, 9, 2, 7, 12, 4), (9,), (9, 4)], ids=["batch6", "batch1", "batch2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_generate_same_tokens_with_and_without_few_rows_paths(monkeypatch, lengths, dtype):
    """Greedy decoding of 6, 1 and 2 prompts: fp32 takes the oneDNN copy (2+ rows) or W as two
    halves (1 row), bf16 takes its own vector kernel (1-2 rows) or the oneDNN copy (3+). The fast
    paths change only rounding, so the greedy tokens are those of plain F.linear everywhere."""
    m = tiny_model(n_kv=2, seed=9).to(dtype)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
    quick = generate(m, prompts, max_new_tokens=12)
    monkeypatch.setattr(fast, "FEW_ROWS", (10**9, 0))  # an empty range
    monkeypatch.setattr(fast, "ONE_ROW_HALVES", False)
    monkeypatch.setattr(fast, "BF16_ROWS_WITHOUT_ONEDNN", 0)  # F.linear always
    monkeypatch.setattr(fast, "ONEDNN_COPY_ROWS", {})
    plain = generate(m, prompts, max_new_tokens=12)
    assert quick == plain and all(len(o) == 12 for o in quick)


# ----------------------------------------------------------------------------------------------
# top-p: the top-256 shortcut vs a full sort


def test_greedy_widened_argmax_equals_bf16_argmax():
    """Greedy picks on bf16 logits widened to fp32 (faster on CPU) are bf16's own argmax, also
    with ties (both return the first maximum) and with -inf entries."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(16, 500, generator=g).mul(4).round().to(torch.bfloat16)  # many ties
    logits[3] = 1.0  # a row of nothing but ties
    logits[5, :250] = float("-inf")
    got = sample_next(logits, temperature=0.0, top_p=1.0, generator=None)
    assert torch.equal(got, logits.argmax(-1))
    assert got[3].item() == 0 and (logits == logits.max(-1, keepdim=True).values).sum().item() > 16


def nucleus_reference(logits, temperature, top_p):
    """The textbook nucleus: sort the whole vocabulary, keep the smallest prefix reaching top_p."""
    probs = (logits.float() / temperature).softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))


def capture_sampling_probs(monkeypatch, logits, temperature, top_p, seed):
    """Run sample_next, returning (tokens, the probability rows it handed to multinomial)."""
    captured = []
    real = torch.multinomial

    def spy(probs, n, **kw):
        captured.append(probs.clone())
        return real(probs, n, **kw)

    monkeypatch.setattr(generation.torch, "multinomial", spy)
    try:
        toks = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(seed))
    finally:
        monkeypatch.setattr(generation.torch, "multinomial", real)
    return toks, captured[0]


def assert_same_nonzeros(got, ref):
    """Each row of `got` holds the nonzero probabilities of `ref`'s row, in the same order."""
    for g_row, r_row in zip(got, ref):
        assert torch.allclose(g_row[g_row > 0], r_row[r_row > 0], rtol=0, atol=1e-7)


def assert_draws_follow(p, draws, bins: int = 20):
    """`draws` (n token ids) look like n draws from `p` (vocab,): none where p is 0, and the
    tokens, cut in token-id order into `bins` runs of about equal probability (a likely token is
    a run of its own), each drawn within 5 standard errors of n x its probability. Runs, not
    single tokens: a flat nucleus of thousands of tokens expects each fewer than once."""
    n = len(draws)
    counts = torch.bincount(draws, minlength=len(p)).double()
    assert counts[p == 0].sum().item() == 0
    run = ((p.cumsum(0) - p) * bins).floor().clamp(max=bins - 1).long()  # (vocab,) each token's run
    mass = torch.zeros(bins, dtype=torch.float64).index_add(0, run, p)
    freq = torch.zeros(bins, dtype=torch.float64).index_add(0, run, counts) / n
    assert bool(((freq - mass).abs() <= 5 * (mass * (1 - mass) / n).sqrt() + 1e-12).all()), (freq, mass)


def make_logits(rows_scale, V, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(V, generator=g) * s for s in rows_scale])


@pytest.mark.parametrize("case", ["peaked", "flat-needs-full-sort", "mixed-batch"])
def test_top_p_shortcut_samples_the_full_sort_nucleus(case, monkeypatch):
    V, top_p, temperature = 4000, 0.9, 0.8
    scales = {"peaked": [6.0, 8.0, 5.0],  # nucleus well inside the top 256
              "flat-needs-full-sort": [0.3, 0.1],  # near uniform: the nucleus is thousands wide
              "mixed-batch": [7.0, 0.2, 6.0]}[case]
    logits = make_logits(scales, V, seed=len(case))
    ref = nucleus_reference(logits, temperature, top_p)
    kept = (ref > 0).sum(-1)
    if case != "peaked":
        assert kept.max().item() > 256  # the case really needs more than the shortcut's 256
    if case == "peaked":
        assert kept.max().item() < 256
    toks, got = capture_sampling_probs(monkeypatch, logits, temperature, top_p, seed=11)
    # multinomial draws among the 256 candidates only, unless the nucleus needed the full sort ...
    assert got.shape[-1] == (256 if case == "peaked" else V)
    # ... with the nucleus's probabilities, in token-id order, as in the whole-vocabulary reference
    assert_same_nonzeros(got, ref)
    # ... so the draws follow the nucleus: each row 3,000 times in one batch, every draw inside it
    # and every bin of tokens drawn as often as its probability says
    n = 3000
    draws = sample_next(logits.repeat_interleave(n, 0), temperature, top_p, torch.Generator().manual_seed(12))
    for kept_mass, row_draws in zip(ref.double(), draws.view(len(scales), n)):
        assert_draws_follow(kept_mass / kept_mass.sum(), row_draws)  # the nucleus renormalised
    # ... and a seed gives the same draws again
    same = [sample_next(logits, temperature, top_p, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(same[0], same[1])


def test_top_p_shortcut_small_vocab(monkeypatch):
    """Vocabulary below 256: the shortcut's top-k is the whole (sorted) vocabulary."""
    logits = make_logits([1.0, 3.0], 100, seed=3)
    ref = nucleus_reference(logits, 1.0, 0.7)
    _, got = capture_sampling_probs(monkeypatch, logits, 1.0, 0.7, seed=0)
    assert got.shape == ref.shape  # the candidates are the whole vocabulary, in token-id order
    assert_same_nonzeros(got, ref)


# ----------------------------------------------------------------------------------------------
# response_nll vs full logits


@torch.no_grad()
@pytest.mark.parametrize("chunk", [2048, 5])
def test_response_nll_equals_masked_full_cross_entropy(chunk):
    m = tiny_model(n_kv=2, seed=1)
    lengths = [30, 22, 17]
    T = max(lengths)
    ids = ids_of((3, T), 7)
    target = torch.zeros(3, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        ids[b, n:] = 0  # right padding
        target[b, n // 2:n] = True  # the "response": the second half of each row
    target[:, 0] = False
    batch = Batch(ids, target, torch.tensor(lengths))
    nll, count = response_nll(m, batch, chunk_tokens=chunk)
    logits = m(ids)  # (B, T, V): the head on every position, the plain way
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                         reduction="none").view(3, T - 1)
    ref = (ce * target[:, 1:]).sum(1)
    assert torch.equal(count, target[:, 1:].sum(1))
    assert (nll - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("lengths", [[9, 23, 4, 17], [23, 23, 23, 23]], ids=["padded", "no-padding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_equal_padded_batch(dtype, lengths):
    """hidden_states(lengths=...) runs the layers on the real tokens only: its rows equal the
    padded forward's real positions, and a LoRA loss's gradients are the same either way."""
    from lora import inject_lora
    m = tiny_model(n_kv=2, seed=2).to(dtype)
    inject_lora(m, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0, seed=0)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    lengths = torch.tensor(lengths)
    ids = ids_of((4, 23), 11)
    real = torch.arange(23)[None] < lengths[:, None]
    ids[~real] = 0
    weights = torch.randn(int(real.sum()), m.cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    out, grads = [], []
    for packed in (True, False):
        m.zero_grad()
        h = m.hidden_states(ids, lengths=lengths) if packed else m.hidden_states(ids)[real]  # (N, hidden)
        (h.float() * weights.float()).sum().backward()
        out.append(h.detach().float())
        grads.append({n: p.grad.float().clone() for n, p in m.named_parameters() if p.requires_grad})
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out[0].shape == (int(lengths.sum()), m.cfg.hidden_size)
    assert (out[0] - out[1]).abs().max().item() <= tol * out[1].abs().max().item()
    for n in grads[0]:
        scale = grads[1][n].abs().max().item()
        assert scale > 0 and (grads[0][n] - grads[1][n]).abs().max().item() <= tol * scale, n
    with pytest.raises(ValueError, match="cannot be combined"):
        m.hidden_states(ids, mask=torch.ones(4, 1, 23, 23, dtype=torch.bool), lengths=lengths)


# ----------------------------------------------------------------------------------------------
# bf16 vs fp32 perplexity on the real model


def test_bf16_perplexity_within_one_percent_of_fp32(smollm2_dir):
    import tasks
    from perplexity import dataset_perplexity
    from tokenizer import Tokenizer

    tok = Tokenizer.from_folder(smollm2_dir)
    pairs = [(e.prompt, e.answer) for e in tasks.splits("gsm8k")["train"][:8]]
    res = {}
    for dtype in ("fp32", "bf16"):
        m = fast.apply(Transformer.from_pretrained(smollm2_dir, dtype), True)
        res[dtype] = dataset_perplexity(m, tok, pairs, batch_size=8)
        del m
    a, b = res["bf16"], res["fp32"]
    assert a["n"] == b["n"] == 8 and a["tokens"] == b["tokens"]
    assert 1.0 < b["mean_ppl"] < 20.0  # a real model on real text, not a broken load
    assert abs(a["mean_ppl"] - b["mean_ppl"]) / b["mean_ppl"] < 0.01
    assert abs(a["pooled_ppl"] - b["pooled_ppl"]) / b["pooled_ppl"] < 0.01


# ----------------------------------------------------------------------------------------------
# CUDA: the GPU fast paths (flash attention in bf16, the cache and generation on the device).
# Skipped where torch sees no GPU, which includes CI; run on a lent H100 with
# `python -m pytest -q tests/test_fast_paths.py -k cuda`.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def flash_shaped_model(seed=0) -> Transformer:
    """head_dim 64 (flash needs a multiple of 8), GQA 4 query heads over 2 kv heads."""
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0)
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    m.requires_grad_(False)
    return fast.apply(m, True)


@cuda
@torch.no_grad()
def test_cuda_flash_bf16_equals_math_path_and_cpu_fp32():
    """Plain causal attention on CUDA in bf16 must be eligible for the flash kernel (forcing it
    raises otherwise) and agree with the math path and with fp32 on the CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cpu = flash_shaped_model()
    ids = ids_of((3, 50), 21)
    ref = cpu(ids).float()
    gpu = flash_shaped_model().to("cuda", torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = gpu(ids.cuda()).float().cpu()
    math_path = fast.apply(gpu, False)(ids.cuda()).float().cpu()  # the plain model
    scale = ref.abs().max().item()
    assert (flash - math_path).abs().max().item() <= 0.02 * scale
    assert (flash - ref).abs().max().item() <= 0.03 * scale
    gpu32 = flash_shaped_model().to("cuda")
    assert (gpu32(ids.cuda()).cpu() - ref).abs().max().item() <= 1e-4


@cuda
@torch.no_grad()
def test_cuda_perplexity_bf16_within_1pct_of_cpu_fp32():
    cpu = flash_shaped_model(seed=1)
    gpu = flash_shaped_model(seed=1).to("cuda", torch.bfloat16)
    ids = ids_of((4, 40), 22)
    tgt = torch.zeros_like(ids, dtype=torch.bool)
    tgt[:, 15:] = True
    lengths = torch.full((4,), 40)
    ref, n_ref = response_nll(cpu, Batch(ids, tgt, lengths))
    got, n_got = response_nll(gpu, Batch(ids, tgt, lengths).to("cuda"))
    assert n_got.cpu().tolist() == n_ref.tolist()
    assert ((got.cpu() - ref).abs() / ref).max().item() <= 0.01


@cuda
def test_cuda_generate_batched_equals_alone_and_cpu():
    """fp32 greedy generation on the GPU (SDPA decode with the cache and padding mask, rows leaving
    the batch) gives each row's tokens alone and the same tokens as the CPU path."""
    g = torch.Generator().manual_seed(23)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (9, 3, 14, 6)]
    gpu = flash_shaped_model(seed=2).to("cuda")
    batched = generate(gpu, prompts, max_new_tokens=12)
    assert batched == [generate(gpu, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == generate(flash_shaped_model(seed=2), prompts, max_new_tokens=12)


def lora_grads(device, model_seed: int, ids_seed: int, autocast_dtype=None, recompute: bool = False) -> dict:
    """LoRA (q/v, r 4) gradients of masked_nll_sum on a flash-shaped model: B drawn on the CPU
    (the same values on every device), so that A gets a gradient too."""
    from lora import inject_lora
    from train import masked_nll_sum
    m = flash_shaped_model(seed=model_seed).to(device)
    inject_lora(m, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0, seed=0)
    g = torch.Generator().manual_seed(1)
    for n, p in m.named_parameters():
        if p.requires_grad and "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    m.gradient_checkpointing = recompute
    ids = ids_of((2, 30), ids_seed)
    tgt = torch.zeros_like(ids, dtype=torch.bool)
    tgt[:, 10:] = True
    masked_nll_sum(m, Batch(ids, tgt, torch.full((2,), 30)).to(device), autocast_dtype).backward()
    return {n: p.grad.float().cpu() for n, p in m.named_parameters() if p.requires_grad}


@cuda
def test_cuda_lora_gradients_equal_cpu():
    grads = {device: lora_grads(device, 3, 24) for device in ("cpu", "cuda")}
    assert grads["cpu"].keys() == grads["cuda"].keys() and grads["cpu"]
    for n, g_cpu in grads["cpu"].items():
        assert (grads["cuda"][n] - g_cpu).abs().max().item() <= 1e-4 * max(1.0, g_cpu.abs().max().item()), n


@cuda
def test_cuda_grad_checkpoint_under_bf16_autocast_keeps_the_gradients():
    """train.py on CUDA autocasts to bf16; recomputing each layer in the backward
    (--grad-checkpoint) must replay that autocast and give the same LoRA gradients."""
    grads = {recompute: lora_grads("cuda", 4, 25, torch.bfloat16, recompute) for recompute in (False, True)}
    assert grads[False].keys() == grads[True].keys() and grads[False]
    for n, g_plain in grads[False].items():
        assert (grads[True][n] - g_plain).abs().max().item() <= 1e-3 * max(1.0, g_plain.abs().max().item()), n
