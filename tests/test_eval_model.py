"""eval.py with a model: likelihood multiple choice on a hand-made item, deterministic greedy
accuracy, auditable records, Spearman, and the comparison report."""

import json

import pytest

import eval as ev
from model import Transformer
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Transformer.from_pretrained(smollm2_dir, "fp32"), Tokenizer.from_folder(smollm2_dir)


def test_multiple_choice_hand_made_item(smol):
    model, tok = smol
    prompt = "What is the capital city of France?"
    options = ["The capital of France is Paris.", "The capital of France is a purple elephant sandwich.",
               "The capital of France is 7."]
    scored = ev.option_nlls(model, tok, prompt, options)
    raw, norm = ev.choice_logprobs(lambda _p, o: scored[options.index(o)], prompt, options)
    assert raw == 0 and norm == 0
    assert all(t > 0 for _, t in scored) and scored[0][0] > scored[1][0]


def test_greedy_accuracy_is_deterministic_and_auditable(smol, tmp_path):
    model, tok = smol
    a = ev.evaluate_task(model, tok, "gsm8k", n=4, max_new_tokens=48, records_path=tmp_path / "a.jsonl")
    b = ev.evaluate_task(model, tok, "gsm8k", n=4, max_new_tokens=48, batch_size=2)
    assert a["records"] == b["records"]  # batch size and rerun change nothing
    rows = [json.loads(l) for l in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) >= {"prompt", "output", "extracted", "gold", "correct"}
    assert a["accuracy"] == sum(r["correct"] for r in rows) / 4
    for r in rows:  # every verdict can be recomputed from the record
        assert r["correct"] == ev.answers_match(ev.extract_answer(r["output"], "gsm8k"), r["gold"], "gsm8k")


def test_gsm8k_verdicts_of_scripted_replies(monkeypatch, tmp_path):
    """The scoring behind a generated-answer accuracy: replies are scripted (no model), so the
    expected verdicts are known; the stored record says what was extracted from what."""
    import data
    import tasks
    test = tasks.splits("gsm8k")["test"][:4]
    replies = [f"So she has {test[0].gold} left.\nFinal Answer: {test[0].gold}",
               "The total is 12.\n#### 12345",  # a stated answer, not the gold one
               "",  # nothing generated
               f"Adding up gives \\boxed{{{test[3].gold}}}."]
    assert test[1].gold != "12345"
    prompts_seen = []

    def scripted(model, tok, prompts, max_new_tokens, batch_size, progress):
        prompts_seen.extend(prompts)
        return replies
    monkeypatch.setattr(data, "generate_responses", scripted)
    r = ev.evaluate_task(None, None, "gsm8k", n=4, records_path=tmp_path / "r.jsonl")
    assert prompts_seen == [e.prompt for e in test]
    assert [x["correct"] for x in r["records"]] == [True, False, False, True]
    assert [x["extracted"] for x in r["records"]] == [test[0].gold, "12345", None, test[3].gold]
    assert [x["gold"] for x in r["records"]] == [e.gold for e in test]
    assert [x["id"] for x in r["records"]] == [e.id for e in test]
    assert r["accuracy"] == 0.5 and (r["ci_low"], r["ci_high"]) == ev.accuracy_ci([1, 0, 0, 1])[1:]
    assert [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()] == r["records"]


def test_csqa_scores_both_ways(smol):
    """Each option's log-likelihood is its whole chat's, scored on its own; the picks are the
    first argmax of the sums (raw) and of the per-token means (norm); the accuracy follows."""
    from data import render
    from perplexity import example_nlls
    model, tok = smol
    r = ev.evaluate_task(model, tok, "csqa", n=3)
    assert r["n"] == 3 and len(r["records"]) == 3
    first_max = lambda v: max(range(len(v)), key=lambda i: (v[i], -i))  # noqa: E731
    for rec, e in zip(r["records"], tasks_test("csqa")[:3]):
        assert len(rec["logprobs"]) == len(rec["options"]) == len(rec["tokens"]) == 5 and rec["gold"] == e.gold
        alone = example_nlls(model, [render(tok, e.question_with_options, o) for o in e.choices], tok.pad_id)
        assert rec["tokens"] == [x.tokens for x in alone]
        for lp, x in zip(rec["logprobs"], alone):
            assert lp == pytest.approx(-x.nll, abs=1e-3)
        assert rec["extracted"] == "ABCDE"[first_max(rec["logprobs"])]
        assert rec["extracted_norm"] == "ABCDE"[first_max([a / t for a, t in zip(rec["logprobs"], rec["tokens"])])]
        assert rec["correct"] == (rec["extracted"] == e.gold) and rec["correct_norm"] == (rec["extracted_norm"] == e.gold)
    assert r["accuracy"] == sum(x["correct"] for x in r["records"]) / 3
    assert r["accuracy_norm"] == sum(x["correct_norm"] for x in r["records"]) / 3


def test_choice_verdicts_of_scripted_likelihoods(monkeypatch):
    """Scripted option scores where the raw and the per-token picks differ: each verdict uses its
    own pick, and ties go to the first option."""
    test = tasks_test("csqa")[:2]
    gold_index = ["ABCDE".index(e.gold) for e in test]
    long_one = [(gold_index[0] + 1) % 5, (gold_index[1] + 1) % 5]

    def scripted(model, tok, prompt, options):
        i = next(i for i, e in enumerate(test) if e.question_with_options == prompt)
        scores = [(-10.0, 2)] * 5  # mean -5 each
        scores = [(-4.0, 1) if j == gold_index[i] else s for j, s in enumerate(scores)]  # best sum
        scores = [(-6.0, 6) if j == long_one[i] else s for j, s in enumerate(scores)]  # best mean
        return scores if i == 0 else [(-1.0, 1)] * 5  # question 2: a five-way tie
    monkeypatch.setattr(ev, "option_nlls", scripted)
    r = ev.evaluate_task(None, None, "csqa", n=2)
    a, b = r["records"]
    assert (a["extracted"], a["extracted_norm"]) == (test[0].gold, "ABCDE"[long_one[0]])
    assert (a["correct"], a["correct_norm"]) == (True, False)
    assert b["extracted"] == b["extracted_norm"] == "A" and b["correct"] == (test[1].gold == "A")
    assert r["accuracy"] == (1 + (test[1].gold == "A")) / 2 and r["accuracy_norm"] == (test[1].gold == "A") / 2


def tasks_test(task):
    import tasks
    return tasks.splits(task)["test"]


@pytest.mark.parametrize("x,y,rho", [([1, 2, 3, 4], [10, 20, 30, 40], 1.0), ([1, 2, 3], [3, 2, 1], -1.0),
                                     ([1, 2, 3, 4], [1, 3, 2, 4], 0.8), ([1, 1, 2], [1, 2, 3], 0.8660254)])
def test_spearman(x, y, rho):
    assert ev.spearman(x, y) == pytest.approx(rho, abs=1e-6)


def fake_run(folder, source, ppl, gsm, csqa):
    folder.mkdir(parents=True)
    t = lambda a: {"accuracy": a, "ci_low": a / 2, "ci_high": min(1, a * 1.5), "n": 32}  # noqa: E731
    (folder / "results.json").write_text(json.dumps({
        "source": source, "model": "m", "task": "gsm8k",
        "perplexity": {"mean_ppl": ppl, "pooled_ppl": ppl * 0.9},
        "test": {"gsm8k": t(gsm), "csqa": t(csqa)}, "base": {"gsm8k": t(0.1), "csqa": t(0.3)}}))
    return str(folder)


def test_report_table_and_plot(tmp_path):
    runs = [fake_run(tmp_path / "a", "human", 4.0, 0.10, 0.20), fake_run(tmp_path / "b", "self", 2.0, 0.30, 0.28),
            fake_run(tmp_path / "c", "rewrite", 3.0, 0.20, 0.31)]
    report = ev.write_report(runs).read_text()
    assert "| self | 2.000 | 1.800 | 0.300 [0.150, 0.450] | 0.280 [0.140, 0.420] | -0.020 |" in report
    assert "| human | 4.000 | 3.600 | 0.100 [0.050, 0.150] | 0.200 [0.100, 0.300] | -0.100 |" in report
    assert "Spearman correlation" in report and "-1.000" in report
    if "no plot" not in report:
        assert (tmp_path / "perplexity_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="not found"):
        ev.main(["report", str(tmp_path / "missing")])
