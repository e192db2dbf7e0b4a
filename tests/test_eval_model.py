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


def test_csqa_scores_both_ways(smol):
    model, tok = smol
    r = ev.evaluate_task(model, tok, "csqa", n=3)
    assert r["n"] == 3 and "accuracy_norm" in r
    rec = r["records"][0]
    assert len(rec["logprobs"]) == len(rec["options"]) == 5 and rec["gold"] in "ABCDE"


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
