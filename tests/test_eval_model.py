"""eval.py with a model: likelihood multiple choice on a hand-made item, deterministic greedy
accuracy, auditable records, Spearman, and the comparison report."""

import json
import math

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
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) >= {"prompt", "output", "extracted", "gold", "correct"}
    assert a["accuracy"] == sum(r["correct"] for r in rows) / 4
    # (what each verdict should be is checked below, on scripted replies whose verdicts are known)
    assert [r["id"] for r in rows] == [f"gsm8k/test/{i}" for i in range(4)]
    assert [r["gold"] for r in rows] == ["18", "3", "70000", "540"]


def test_gsm8k_verdicts_of_scripted_replies(monkeypatch, tmp_path):
    """The scoring behind a generated-answer accuracy: replies are scripted (no model), so the
    expected verdicts are known; the stored record says what was extracted from what."""
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
    monkeypatch.setattr(ev, "generate_responses", scripted)
    r = ev.evaluate_task(None, None, "gsm8k", n=4, records_path=tmp_path / "r.jsonl")
    assert prompts_seen == [e.prompt for e in test]
    assert [x["correct"] for x in r["records"]] == [True, False, False, True]
    assert [x["extracted"] for x in r["records"]] == [test[0].gold, "12345", None, test[3].gold]
    assert [x["gold"] for x in r["records"]] == [e.gold for e in test]
    assert [x["id"] for x in r["records"]] == [e.id for e in test]
    assert r["accuracy"] == 0.5 and (r["ci_low"], r["ci_high"]) == ev.accuracy_ci([1, 0, 0, 1])[1:]
    assert [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()] == r["records"]


def test_math_verdicts_of_scripted_replies(monkeypatch):
    """MATH's rules on scripted replies, expected values written by hand: the last box, else the
    Final Answer line; numbers compare by value (10.00 = 10, \\frac{9}{7} = \\dfrac{9}{7}),
    anything else as normalised LaTeX (-i is not i)."""
    replies = ["The graph has $\\boxed{2}$ vertical asymptotes.",  # gold 2
               "Adding the two gives 10.\nFinal Answer: 10.00",  # gold 10
               "So $x = \\boxed{\\frac{9}{7}}$.",  # gold \\dfrac{9}{7}
               "First $\\boxed{i}$, but squaring flips it: $\\boxed{-i}$."]  # gold i
    monkeypatch.setattr(ev, "generate_responses", lambda model, tok, prompts, *a, **k: replies)
    r = ev.evaluate_task(None, None, "math", n=4)
    assert [x["gold"] for x in r["records"]] == ["2", "10", "\\dfrac{9}{7}", "i"]
    assert [x["extracted"] for x in r["records"]] == ["2", "10.00", "\\frac{9}{7}", "-i"]
    assert [x["correct"] for x in r["records"]] == [True, True, True, False]
    assert r["accuracy"] == 0.75


def test_csqa_scores_both_ways(smol):
    """Each option's log-likelihood is its whole chat's, scored on its own; the picks are the
    first argmax of the sums (raw) and of the per-token means (norm); the accuracy follows."""
    from data import render
    from nll import example_nlls
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


def write_answers(folder, task, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"eval-{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def gsm_rows(verdicts):
    return [{"id": f"q{i}", "correct": c} for i, c in enumerate(verdicts)]


def csqa_rows(logprobs):  # gold A for c0, B for c1
    return [{"id": f"c{i}", "gold": "AB"[i], "logprobs": lp, "extracted": "AB"[lp.index(max(lp))],
             "correct": lp.index(max(lp)) == i} for i, lp in enumerate(logprobs)]


def fake_run(folder, source, ppls, gsm, csqa, base_dir):
    write_answers(folder, "gsm8k", gsm_rows(gsm))
    write_answers(folder, "csqa", csqa_rows(csqa))
    t = lambda rows: {"accuracy": sum(r["correct"] for r in rows) / len(rows), "ci_low": 0.0, "ci_high": 1.0,  # noqa: E731
                      "n": len(rows)}
    (folder / "perplexity.json").write_text(json.dumps({"per_example": [{"ppl": p} for p in ppls]}))
    paths = {"human": {"file": 2}, "self": {"ground_truth": 1, "rationalized": 1}}.get(source, {"chose:self": 2})
    (folder / "config.json").write_text(json.dumps({"manifest": {"counts_by_path": paths}}))
    (folder / "results.json").write_text(json.dumps({
        "source": source, "model": "m", "task": "gsm8k", "run_dir": str(folder), "train_examples": 2,
        "perplexity": {"mean_ppl": sum(ppls) / len(ppls), "pooled_ppl": 1.0},
        "validation_loss": {"before": 2.0, "after": 1.5, "relative_change": -0.25, "learned": source != "human"},
        "test": {"gsm8k": t(gsm_rows(gsm)), "csqa": t(csqa_rows(csqa))}, "base_dir": str(base_dir)}))
    return str(folder)


def test_report_pairs_every_comparison_per_question(tmp_path):
    """The paired numbers, computed by hand from the per-question answers:
    untuned gsm8k F F T F; human T F T F; self T T T T.
    self - untuned = 3/4 (3 discordant, all for self: McNemar p = 2 * 1/8 = 0.25);
    self - human = 2/4 (p = 2 * 1/4 = 0.5); human - untuned = 1/4 (p = 1).
    csqa gold log-likelihoods: untuned -1, -1; self -1.5, -2: change -0.75."""
    base = tmp_path / "base"
    write_answers(base, "gsm8k", gsm_rows([False, False, True, False]))
    write_answers(base, "csqa", csqa_rows([[-1.0, -2.0], [-3.0, -1.0]]))
    runs = [fake_run(tmp_path / "h", "human", [4.0, 4.0], [True, False, True, False], [[-1.0, -2.0], [-3.0, -1.0]], base),
            fake_run(tmp_path / "s", "self", [2.0, 2.0], [True] * 4, [[-1.5, -2.0], [-3.0, -2.0]], base)]
    report = ev.write_report(runs, str(tmp_path / "out")).read_text()
    cmp_ = json.loads((tmp_path / "out" / "report.json").read_text())
    human, self_ = cmp_["sources"]
    g = self_["tasks"]["gsm8k"]
    assert g["vs_untuned"]["difference"] == pytest.approx(0.75) and g["vs_untuned"]["p"] == pytest.approx(0.25)
    assert (g["vs_untuned"]["a_only"], g["vs_untuned"]["b_only"]) == (3, 0)
    assert g["vs_human"]["difference"] == pytest.approx(0.5) and g["vs_human"]["p"] == pytest.approx(0.5)
    assert human["tasks"]["gsm8k"]["vs_untuned"]["difference"] == pytest.approx(0.25)
    assert human["tasks"]["gsm8k"]["vs_untuned"]["p"] == pytest.approx(1.0) and "vs_human" not in human["tasks"]["gsm8k"]
    assert self_["tasks"]["csqa"]["gold_loglik_vs_untuned"]["difference"] == pytest.approx(-0.75)
    # among the options, by hand: untuned -log(1 + e^-1), -log(1 + e^-2); self -log(1 + e^-0.5),
    # -log(1 + e^-1): a mean change of -0.17358 nats, where the gold log-likelihood fell 0.75
    by_hand = (-math.log1p(math.exp(-0.5)) - math.log1p(math.exp(-1)) + math.log1p(math.exp(-1))
               + math.log1p(math.exp(-2))) / 2
    assert by_hand == pytest.approx(-0.17358, abs=1e-5)
    assert self_["tasks"]["csqa"]["gold_choice_vs_untuned"]["difference"] == pytest.approx(by_hand)
    assert "| self | +0.0 [+0.0, +0.0] p=1 |" in report.split("csqa accuracy |")[1]  # both still right
    assert "| self | -0.750 [" in report.split("csqa gold log-likelihood |")[1]
    assert "| self | -0.174 [" in report.split("csqa gold among options |")[1]
    assert self_["ppl_ci"] == [2.0, 2.0] and cmp_["untuned"]["gsm8k"] == {"accuracy": 0.25, "n": 4}
    assert cmp_["correlation"]["n"] == 2 and cmp_["correlation"]["r"] == pytest.approx(-1.0)
    assert "| self | 2.000 [2.000, 2.000] | 2.000 -> 1.500 (-25.0%) | 1.000 [0.000, 1.000] | +50.0 [" in report
    assert "- self: 2 examples (ground_truth 1, rationalized 1)" in report and "- human: 2 examples (file 2)" in report
    assert "over fewer than five sources" in report and "[!] Not a result: human" in report
    if "no plot" not in report:
        assert (tmp_path / "out" / "perplexity_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="not found"):
        ev.main(["report", str(tmp_path / "missing")])


def test_report_compares_familiar_with_the_best_single_source(tmp_path):
    """familiar:... against the single source with the best in-domain accuracy (self, 3/4 here, not
    human's 2/4), paired by hand: familiar T T F F vs self T T T F: -1/4, one discordant question
    (McNemar p = 1). Single sources get no such line."""
    base = tmp_path / "base"
    write_answers(base, "gsm8k", gsm_rows([False] * 4))
    write_answers(base, "csqa", csqa_rows([[-1.0, -2.0], [-3.0, -1.0]]))
    mc = [[-1.0, -2.0], [-3.0, -1.0]]
    runs = [fake_run(tmp_path / "h", "human", [4.0, 4.0], [True, False, True, False], mc, base),
            fake_run(tmp_path / "s", "self", [2.0, 2.0], [True, True, True, False], mc, base),
            fake_run(tmp_path / "f", "familiar:human,self", [2.0, 3.0], [True, True, False, False], mc, base)]
    report = ev.write_report(runs, str(tmp_path / "out")).read_text()
    cmp_ = json.loads((tmp_path / "out" / "report.json").read_text())
    human, self_, fam = cmp_["sources"]
    b = fam["vs_best_single"]
    assert b["source"] == "self" and b["difference"] == pytest.approx(-0.25) and b["p"] == pytest.approx(1.0)
    assert (b["a_only"], b["b_only"]) == (0, 1) and "vs_best_single" not in self_ and "vs_best_single" not in human
    assert "familiar:human,self against the best single source on gsm8k (self), paired: -25.0 [" in report
    assert "- familiar:human,self: 2 examples (chose:self 2)" in report


def test_report_names_file_sources_by_file_name_and_counts_answers_left_out(tmp_path):
    """A file source's row names the file, not its whole path (the JSON keeps the path), a familiar
    run's choices likewise; a set of 3 answers of which the run trained on 2 says 1 was left out."""
    base = tmp_path / "base"
    write_answers(base, "gsm8k", gsm_rows([False] * 4))
    write_answers(base, "csqa", csqa_rows([[-1.0, -2.0], [-3.0, -1.0]]))
    mc = [[-1.0, -2.0], [-3.0, -1.0]]
    gpt = "file:/clone/dataset/GSM8K/openai_gpt4_data.json"
    runs = [fake_run(tmp_path / "h", "human", [4.0, 4.0], [True, False, True, False], mc, base),
            fake_run(tmp_path / "g", gpt, [3.0, 3.0], [True, True, True, False], [[-1.0, -2.0], [-1.0, -3.0]], base),
            fake_run(tmp_path / "f", f"familiar:human,{gpt}", [2.0, 3.0], [True, True, False, False], mc, base)]
    cfg = tmp_path / "g" / "config.json"
    cfg.write_text(json.dumps({"manifest": {"counts_by_path": {"file": 3}, "kept": 3}}))
    cfg = tmp_path / "f" / "config.json"
    # 3 questions, one without any correct candidate ("dropped"): 2 kept, 2 trained on, nothing too long
    cfg.write_text(json.dumps({"manifest": {"counts_by_path": {f"chose:{gpt}": 1, "chose:human": 1, "dropped": 1},
                                            "kept": 2}}))
    report = ev.write_report(runs, str(tmp_path / "out")).read_text()
    cmp_ = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [e["source"] for e in cmp_["sources"]] == ["human", gpt, f"familiar:human,{gpt}"]
    assert "| file:openai_gpt4_data.json | 3.000 [" in report and "/clone/" not in report
    assert "- file:openai_gpt4_data.json: 2 examples (file 3; 1 not trained on: longer than --max-seq-len)" in report
    assert "- familiar:human,file:openai_gpt4_data.json: 2 examples (chose:file:openai_gpt4_data.json 1, " \
           "chose:human 1, dropped 1)" in report
    assert "(file:openai_gpt4_data.json), paired: " in report
    # option bias, by hand: untuned and human pick A then B (A: half the picks, half the golds);
    # the GPT-4 run picks A for both questions (100%), and A is gold for one of the two (50%)
    assert "| untuned | A 50% (50%) |" in report and "| human | A 50% (50%) |" in report
    assert "| file:openai_gpt4_data.json | A 100% (50%) |" in report
    assert cmp_["sources"][1]["tasks"]["csqa"]["top_pick"] == {"option": "A", "share": 1.0, "gold_share": 0.5, "n": 2}
    # forgetting against familiarity, by hand: (perplexity, mean change of log p(gold among options))
    # human (4, 0), GPT-4 (3, -2/2: its second answer moved from B to A, -(2 + log(1 + e^-2)) +
    # log(1 + e^-2) = -2), familiar (2.5, 0): Pearson r = 0.16667 / sqrt(1.16667 * 0.66667)
    f = cmp_["correlation_forgetting"]
    assert f["n"] == 3 and f["r"] == pytest.approx(0.16667 / math.sqrt(1.16667 * 0.66667), abs=1e-4)
    assert f["tasks"] == ["csqa"] and "averaged over csqa: Pearson r = 0.189" in report
    assert "less forgetting (a change nearer zero)" in report


def test_report_keeps_the_whole_path_where_two_files_share_a_name(tmp_path):
    """Two file sources named x.json in different folders: their rows keep the whole source (a
    third source with a unique file name is still shortened)."""
    base = tmp_path / "base"
    write_answers(base, "gsm8k", gsm_rows([False] * 4))
    write_answers(base, "csqa", csqa_rows([[-1.0, -2.0], [-3.0, -1.0]]))
    mc = [[-1.0, -2.0], [-3.0, -1.0]]
    runs = [fake_run(tmp_path / f"r{i}", src, [3.0, 3.0], [True, False, True, False], mc, base)
            for i, src in enumerate(["file:/a/x.json", "file:/b/x.json", "file:/c/y.json"])]
    report = ev.write_report(runs, str(tmp_path / "out")).read_text()
    labels = [e["label"] for e in json.loads((tmp_path / "out" / "report.json").read_text())["sources"]]
    assert labels == ["file:/a/x.json", "file:/b/x.json", "file:y.json"]
    assert "| file:/a/x.json | 3.000 [" in report and "| file:/b/x.json | 3.000 [" in report
