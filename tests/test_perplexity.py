"""perplexity.py: the paper's definition, independent of batching and order, and equal to an
independent computation with HF transformers."""

import math
import random

import pytest
import torch

from model import Transformer
from data import Rendered, render
from perplexity import dataset_perplexity, example_nlls, shared_prefix_nlls
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

PAIRS = [
    (f"Question {i}: what is {i} + {i * 3}?",
     " ".join(["Adding", str(i), "and", str(i * 3)] * (1 + i % 5)) + f"\nFinal Answer: {i * 4}")
    for i in range(23)
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model loaded twice: by HF transformers (the reference) and by us."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return hf, Transformer.from_pretrained(tiny_model_dir, "fp32"), Tokenizer.from_folder(tiny_model_dir)


def rel(a, b):
    return abs(a - b) / abs(b)


def test_definition_mean_pooled_median(tiny):
    _, model, tok = tiny
    r = dataset_perplexity(model, tok, PAIRS, batch_size=4)
    per = r["per_example"]
    assert [e["index"] for e in per] == list(range(len(PAIRS)))
    assert r["n"] == len(PAIRS) and r["tokens"] == sum(e["tokens"] for e in per)
    ppls = [math.exp(e["nll"] / e["tokens"]) for e in per]
    assert r["mean_ppl"] == pytest.approx(sum(ppls) / len(ppls), rel=1e-12)
    assert r["pooled_ppl"] == pytest.approx(math.exp(sum(e["nll"] for e in per) / r["tokens"]), rel=1e-12)
    assert r["median_ppl"] == pytest.approx(sorted(ppls)[len(ppls) // 2], rel=1e-12)
    # the paper's mean of per-example perplexities is not the token-weighted pooled value
    assert abs(r["mean_ppl"] - r["pooled_ppl"]) > 1e-6 * r["pooled_ppl"]
    # an even count: the median is the mean of the two middle values
    even = dataset_perplexity(model, tok, PAIRS[:22], batch_size=4)
    s = sorted(math.exp(e["nll"] / e["tokens"]) for e in even["per_example"])
    assert even["median_ppl"] == pytest.approx((s[10] + s[11]) / 2, rel=1e-12)
    assert s[10] != pytest.approx(s[11], rel=1e-6)  # so either middle value alone would fail


def test_batch_size_and_order_do_not_matter(tiny):
    _, model, tok = tiny
    one = dataset_perplexity(model, tok, PAIRS, batch_size=1)
    many = dataset_perplexity(model, tok, PAIRS, batch_size=16)
    for k in ("mean_ppl", "pooled_ppl", "median_ppl"):
        assert rel(many[k], one[k]) <= 1e-5
    for a, b in zip(one["per_example"], many["per_example"]):
        assert a["tokens"] == b["tokens"] and rel(b["nll"], a["nll"]) <= 1e-5
    order = list(range(len(PAIRS)))
    random.Random(3).shuffle(order)
    shuffled = dataset_perplexity(model, tok, [PAIRS[i] for i in order], batch_size=16)
    assert rel(shuffled["mean_ppl"], one["mean_ppl"]) <= 1e-5
    back = {order[e["index"]]: e["nll"] for e in shuffled["per_example"]}
    assert all(rel(back[i], one["per_example"][i]["nll"]) <= 1e-5 for i in range(len(PAIRS)))


def independent_nll(hf, tok, prompt, response):
    """HF's full logits, log-softmax, and the response tokens located by rendering the prompt
    alone: a different route to the same quantity."""
    head = tok.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    full = tok.render_chat([{"role": "user", "content": prompt},
                            {"role": "assistant", "content": response}], add_generation_prompt=False)
    ids = tok.encode(full)
    n_head = len(tok.encode(head))
    eot = ids.index(tok.eot_id, n_head)  # train on the response and its end-of-turn token
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    nll = -sum(logp[t - 1, ids[t]].item() for t in range(n_head, eot + 1))
    return nll, eot + 1 - n_head


def test_matches_independent_hf_computation(tiny):
    hf, model, tok = tiny
    r = dataset_perplexity(model, tok, PAIRS[:8], batch_size=8)
    for e, (p, a) in zip(r["per_example"], PAIRS[:8]):
        nll, n = independent_nll(hf, tok, p, a)
        assert e["tokens"] == n
        assert rel(e["nll"], nll) <= 1e-4


def test_bad_inputs_are_reported_not_nan(tiny):
    _, model, tok = tiny
    with pytest.raises(ValueError, match="empty"):
        dataset_perplexity(model, tok, [])
    long = ("q", "word " * 5000)  # longer than the 2048-token context
    r = dataset_perplexity(model, tok, PAIRS[:3] + [("q", "   "), long])
    assert r["n"] == 3 and r["skipped"] == {"empty_response": 1, "too_long": 1}
    assert all(math.isfinite(e["ppl"]) for e in r["per_example"])
    with pytest.raises(ValueError, match="every example was skipped"):
        dataset_perplexity(model, tok, [("q", ""), long])


def test_bf16_close_to_fp32(tiny):
    _, model, tok = tiny
    fp32 = dataset_perplexity(model, tok, PAIRS, batch_size=8)
    bf = model.to(torch.bfloat16)
    try:
        b = dataset_perplexity(bf, tok, PAIRS, batch_size=8)
    finally:
        model.to(torch.float32)
    assert rel(b["mean_ppl"], fp32["mean_ppl"]) < 0.02


def test_real_smollm2_matches_independent_hf_computation(smollm2_dir):
    """The paper's number on the real packaged model: our perplexity vs HF transformers loading the
    same folder, computed the independent way, on real GSM8K (prompt, human answer) pairs."""
    import tasks
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model, tok = Transformer.from_pretrained(smollm2_dir, "fp32"), Tokenizer.from_folder(smollm2_dir)
    pairs = [(e.prompt, e.answer) for e in tasks.splits("gsm8k", n_train=4)["train"]]
    ours = dataset_perplexity(model, tok, pairs, batch_size=4)
    ppls = []
    for e, (p, a) in zip(ours["per_example"], pairs):
        nll, n = independent_nll(hf, tok, p, a)
        assert e["tokens"] == n
        ppls.append(math.exp(nll / n))
        assert rel(e["ppl"], ppls[-1]) <= 1e-3
    assert rel(ours["mean_ppl"], sum(ppls) / len(ppls)) <= 1e-3


@pytest.fixture(scope="module")
def sharp(tiny):
    """The tiny model with every weight x10 (std ~0.2): confident predictions, so a wrong position,
    shift or cache row moves a score by >5e-2 where the correct code differs by ~1e-7."""
    import copy
    model = copy.deepcopy(tiny[1])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    return model, tiny[2]


@pytest.mark.parametrize("replies", [
    ["Paris.", "Paris is the capital of France, on the Seine.", "7", "", "Paris is a city."],  # an empty reply
    ["Paris.", "Paris is a city.", "Paris is the capital of France."],  # the replies share their first words
])
def test_shared_prefix_equals_whole_chats(sharp, replies, monkeypatch):
    """Options of one question scored with the question run once (multiple choice) give the
    same sums as each whole chat scored alone, and the question really runs only once, cut
    before the first scored token even where the replies begin alike."""
    model, tok = sharp
    rendered = [render(tok, "What is the capital city of France?", r) for r in replies]
    plain = example_nlls(model, rendered, tok.pad_id, batch_size=1)
    calls = []
    real = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda ids, *a, **k: calls.append(tuple(ids.shape)) or real(ids, *a, **k))
    shared = shared_prefix_nlls(model, rendered, tok.pad_id)
    first_target = min(r.mask.index(1) for r in rendered)
    assert calls[0] == (1, first_target)  # the prompt, once, up to the first scored token
    assert calls[1] == (len(replies), max(len(r.ids) for r in rendered) - first_target)
    assert len(calls) == 2
    for a, b in zip(plain, shared, strict=True):
        assert (a.index, a.tokens) == (b.index, b.tokens)
        assert rel(b.nll, a.nll) <= 1e-5


def test_shared_prefix_edge_cases(sharp):
    """Hand-made renderings: one-token remainders (a one-token decoding step), a rendering with
    no target and nothing after the prefix, a single rendering, none at all."""
    model, tok = sharp
    cases = [
        [Rendered([5, 6, 7, 8, 9], [0, 0, 0, 0, 1]), Rendered([5, 6, 7, 8, 10], [0, 0, 0, 0, 1])],
        [Rendered([5, 6, 7, 8, 9, 11], [0, 0, 0, 0, 1, 1]), Rendered([5, 6, 7, 8], [0, 0, 0, 0]),
         Rendered([5, 6, 7, 8, 12], [0, 0, 0, 0, 1])],
        [Rendered([5, 6, 7, 9], [0, 0, 1, 1])],
    ]
    for rendered in cases:
        plain = example_nlls(model, rendered, tok.pad_id, batch_size=1)
        shared = shared_prefix_nlls(model, rendered, tok.pad_id)
        for a, b in zip(plain, shared, strict=True):
            assert a.tokens == b.tokens
            assert a.nll == pytest.approx(b.nll, rel=1e-5, abs=1e-6)
    assert shared_prefix_nlls(model, [], tok.pad_id) == []


def test_table_pairs_each_source_with_the_first_by_question():
    """compare_to_first against hand-computed values: pairing by question text (a question only one
    source answered is left out), the mean per-question difference, and the 'lower on' count."""
    from perplexity import compare_to_first, format_table

    def result(source, ppls):
        per = [{"question": q, "ppl": v} for q, v in ppls.items()]
        vals = list(ppls.values())
        return {"source": source, "n": len(vals), "tokens": 10 * len(vals), "mean_ppl": sum(vals) / len(vals),
                "pooled_ppl": 0.0, "median_ppl": 0.0, "per_example": per}

    human = result("human", {"q1": 4.0, "q2": 5.0, "q3": 6.0, "q4": 3.0})
    other = result("gpt4", {"q2": 4.0, "q1": 3.5, "q3": 6.5, "q9": 1.0})  # q9: not in human, q4 missing
    rows = compare_to_first([human, other])
    assert "vs_first" not in rows[0]
    v = rows[1]["vs_first"]
    assert v["n"] == 3 and v["lower"] == 2  # q1 (3.5 < 4), q2 (4 < 5); q3 is higher
    assert v["diff"][0] == pytest.approx(((3.5 - 4.0) + (4.0 - 5.0) + (6.5 - 6.0)) / 3)
    lo, hi = rows[0]["ci"]
    assert 3.0 <= lo <= human["mean_ppl"] <= hi <= 6.0
    table = format_table([human, other], rows)
    assert "(2 of 3)" in table and "-0.333 [" in table and table.splitlines()[1].startswith("human")
