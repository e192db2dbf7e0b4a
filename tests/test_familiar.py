"""sources.py's familiar:<src>,... source on a tiny random model: per question the correct candidate
with the lowest perplexity, checked against perplexities computed independently by HF
transformers; ties, all-wrong questions, the separator rule, the cache key."""

import json
import math

import pytest
import torch

import sources
import tasks
from test_perplexity import independent_nll

transformers = pytest.importorskip("transformers")
N = 4


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "sources")


@pytest.fixture(scope="module")
def questions():
    return tasks.splits("gsm8k", n_train=N)["train"]


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from tokenizer import Tokenizer
    return (transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(),
            Tokenizer.from_folder(tiny_model_dir))


def answer_file(path, questions, answer):
    """A file source: answer(i, example) for each question, None leaves the question out."""
    rows = [{"question": e.question, "answer": answer(i, e)} for i, e in enumerate(questions)]
    path.write_text(json.dumps([r for r in rows if r["answer"] is not None]))
    return f"file:{path}"


def wrong(e):
    return str(int(e.gold) + 1)


def build(source, model_dir, **kw):
    return sources.build(source, str(model_dir), "gsm8k", N, progress=False, **kw)


def test_the_lowest_perplexity_correct_candidate_wins(tmp_path, questions, tiny_model_dir, hf):
    texts = [  # three correct styles and one wrong one, per question
        lambda i, e: f"We add and multiply step by step.\nFinal Answer: {e.gold}",
        lambda i, e: f"{e.gold} {e.gold} {e.gold}, so the result is {e.gold}.\nFinal Answer: {e.gold}",
        lambda i, e: f"The answer is {wrong(e)}.\nFinal Answer: {wrong(e)}",  # wrong: never chosen
    ]
    files = [answer_file(tmp_path / f"c{k}.json", questions, t) for k, t in enumerate(texts)]
    names = ["human"] + files
    records, manifest = build("familiar:" + ",".join(names), tiny_model_dir)
    assert [r["id"] for r in records] == [e.id for e in questions]

    model, tok = hf
    candidates = [{r["id"]: r["response"] for r in build(n, tiny_model_dir)[0]} for n in names]
    expected = []
    for rec, e in zip(records, questions):
        ppl = []
        for name, cand, c in zip(names, candidates, rec["candidates"]):
            nll, n = independent_nll(model, tok, e.prompt, cand[e.id])
            ppl.append(math.exp(nll / n))
            assert c["source"] == name and c["tokens"] == n
            assert c["ppl"] == pytest.approx(ppl[-1], rel=1e-4)
        assert [c["correct"] for c in rec["candidates"]] == [True, True, True, False]
        best = min(range(3), key=lambda k: ppl[k])
        expected.append(names[best])
        assert rec["source"] == names[best] and rec["path"] == f"chose:{names[best]}"
        assert rec["response"] == candidates[best][e.id]
        assert ppl[best] < sorted(ppl[:3])[1]  # no near-tie decides this test
    # The test can fail: the winners are not all the first source, and the wrong answer was more
    # familiar than the winner somewhere.
    assert set(expected) != {"human"}
    assert any(c["ppl"] < min(x["ppl"] for x in rec["candidates"] if x["correct"])
               for rec in records for c in rec["candidates"] if not c["correct"])
    assert manifest["chosen_by_source"] == {n: expected.count(n) for n in set(expected)}
    assert sum(manifest["counts_by_path"].values()) == N
    assert [c["source"] for c in manifest["candidates"]] == names


def test_a_tie_goes_to_the_source_listed_first(tmp_path, questions, tiny_model_dir):
    same = answer_file(tmp_path / "same.json", questions, lambda i, e: e.answer)  # the human text
    first, _ = build(f"familiar:human,{same}", tiny_model_dir)
    second, m = build(f"familiar:{same},human", tiny_model_dir)
    assert all(r["source"] == "human" for r in first)
    assert all(r["source"] == same for r in second)
    for r in first + second:  # measured once, so exactly equal
        assert r["candidates"][0]["ppl"] == r["candidates"][1]["ppl"]
    assert m["candidate_responses_scored"] == N


def test_no_correct_candidate_falls_back_or_drops(tmp_path, questions, tiny_model_dir):
    # question 0: only b is right; question 1: b leaves it out and a is wrong; the rest: both wrong
    a = answer_file(tmp_path / "a.json", questions, lambda i, e: f"Final Answer: {wrong(e)}")
    b = answer_file(tmp_path / "b.json", questions,
                    lambda i, e: None if i == 1 else f"So {e.gold}." if i == 2 else
                    f"Final Answer: {e.gold if i == 0 else wrong(e)}")  # question 2: only a last number
    records, manifest = build(f"familiar:{a},{b}", tiny_model_dir)
    assert [r["path"] for r in records] == [f"chose:{b}"] + ["ground_truth"] * 3
    assert [r["response"] for r in records[1:]] == [e.answer for e in questions[1:]]
    assert records[1]["candidates"][1] == {"source": b, "path": "dropped", "correct": False, "ppl": None,
                                           "tokens": None}
    assert not records[2]["candidates"][1]["correct"]  # "So 18." states no final answer (ANSWER_RULE)
    assert manifest["counts_by_path"] == {f"chose:{b}": 1, "ground_truth": 3}
    kept, manifest = build(f"familiar:{a},{b}", tiny_model_dir, self_fallback="drop")
    assert [r["path"] for r in kept] == [f"chose:{b}"]
    assert manifest["counts_by_path"] == {f"chose:{b}": 1, "dropped": 3} and manifest["kept"] == 1


def test_answer_rule_on_built_records():
    rec = {"gold": "18", "response": "so 9 + 9 = 18.\nFinal Answer: 18"}
    assert sources.candidate_correct({**rec, "path": "teacher_correct"}, "gsm8k")
    assert sources.candidate_correct({**rec, "path": "ground_truth"}, "gsm8k")
    # its source found it cut off or wrong: the text alone cannot tell, the label can
    assert not sources.candidate_correct({**rec, "path": "teacher_wrong"}, "gsm8k")
    assert not sources.candidate_correct({**rec, "path": "file", "response": "so 9 + 9 = 18."}, "gsm8k")


def test_separator_rule_and_bad_lists(tmp_path):
    split = sources.familiar_candidates
    assert split("human,self") == ["human", "self"]
    assert split("file:a,b.json,self,teacher:m") == ["file:a,b.json", "self", "teacher:m"]
    assert split("file:x,selfish.json,file:y.json") == ["file:x,selfish.json", "file:y.json"]
    for bad, needle in [("human", "two or more"), ("human,human", "listed twice"),
                        ("human,familiar:self,rewrite", "cannot list another familiar"), ("human,bogus", "unknown source")]:
        with pytest.raises(ValueError, match=needle):
            sources.source_kind(f"familiar:{bad}")


def test_cache_key_holds_the_candidates_keys(tmp_path, questions, tiny_model_dir, monkeypatch):
    path = tmp_path / "with,comma.json"  # a comma in the path: kept (no source name follows it)
    src = f"familiar:human,{answer_file(path, questions, lambda i, e: e.answer)}"
    first, m1 = build(src, tiny_model_dir)
    assert m1["candidates"][1]["source"] == f"file:{path}"
    monkeypatch.setattr(sources, "build_familiar", lambda *a, **k: pytest.fail("rebuilt a cached set"))
    assert build(src, tiny_model_dir) == (first, m1)
    answer_file(path, questions, lambda i, e: e.answer + " ")  # the file changed: a new set
    with pytest.raises(pytest.fail.Exception):
        build(src, tiny_model_dir)


def test_existing_sets_keep_their_cache_folders():
    """familiar adds keys to its own inputs only: every set built before keeps its folder."""
    folder = {s: sources.cache_folder(sources.set_inputs(s, "smollm2-135m-instruct", "gsm8k", None, 0, "bf16")).name
              for s in ("human", "self")}
    assert folder == {"human": "human-fb932e0fcaf2a7e7", "self": "self-6a784d57f687d0ad"}
