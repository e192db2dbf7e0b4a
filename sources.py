"""The response sources the paper compares: one training set per source, on the same questions.

Each source answers the same training questions (tasks.splits(..., n_train=N)); only who wrote
the responses differs (paper section 2):

| source                  | response                                                             |
|-------------------------|----------------------------------------------------------------------|
| human                   | the data set's solution (GSM8K `#### N` -> `Final Answer: N`)        |
| self                    | the target model's own sampled answer with a correct final answer    |
|                         | (the paper's "sample k", STaR/RFT); else STaR rationalisation (the   |
|                         | answer is given as a hint); else the ground truth, or dropped        |
| rewrite                 | the target model restates the ground truth in its own words (SDFT);  |
|                         | kept if its final answer still matches, else the ground truth        |
| teacher:<model>         | another model answers directly (the paper's GPT-4/Claude source);   |
|                         | not filtered unless --filter-correct                                 |
| minimum-change:<model>  | the target model's greedy prediction, corrected by <model> with as   |
|                         | few changes as possible; the original prediction is kept beside it   |
| step-by-step:<model>    | <model> reformats the ground truth as numbered steps; kept if its    |
|                         | final answer still matches, else the ground truth                    |
| paraphrase:<model>      | <model> answers (as teacher:<model>), then paraphrases that answer;  |
|                         | not filtered unless --filter-correct; the answer is kept beside it   |
| file:<path>             | a JSON list or JSONL of {question, answer} (the paper's released     |
|                         | files work as they are), matched to the task's questions by text     |
| familiar:<src>,<src>,...| per question, of the listed sources' responses whose final answer is |
|                         | correct, the one with the lowest untuned perplexity (GRAPE, arXiv    |
|                         | 2502.04194); none correct: the ground truth, or dropped              |

"Correct" (ANSWER_RULE) is stricter than evaluation's grading: the reply must have ended by
itself and must state its final answer (`\boxed{}`, `Final Answer:` or `####`); evaluation also
takes the last number anywhere. A training response that was cut off mid-sentence, or that only
echoes the hinted number somewhere in its text, would otherwise be kept and trained on, with an
end-of-turn token after it, as a finished, correct answer.

Every built set is cached as `data.jsonl` beside `manifest.json` (source, models, task, prompt
templates, generation settings, seed, counts by path, coverage, time, and the hash of all the
inputs that names the folder). Same inputs: the cache is reused. Changed inputs: a new folder.
Interrupted build: the records written so far (one fsync'd chunk at a time) are kept and the
build continues from the next chunk; a chunk's samples depend only on (seed, chunk), so a
resumed build equals an uninterrupted one.

`familiar` (not in the paper; its follow-ups rank sources by familiarity, GRAPE picks per
question): the candidates are the sets the listed sources build (cached as usual, with the same
settings), each candidate's perplexity is the per-example value of perplexity.py (nll.py, fp32,
response + end-of-turn token), and a candidate is correct under ANSWER_RULE: its stated final
answer equals the gold, and a generated reply must have ended by itself, which its source's path
label records (`*_wrong` never counts). Identical responses (the self source's ground-truth
fallback and `human`) are measured once, so they tie exactly; a tie goes to the source listed
first. Separator rule: a comma starts a new candidate only where a source name follows it
(`human`, `self` or `rewrite` followed by a comma or the end, or `KIND:`), so a file path may
hold a comma unless one of those follows it. Each record keeps which source won (`source`) and
every candidate's path, correctness and perplexity; the manifest counts the winners. The
scoring (one batched forward pass per distinct candidate) is not resumable: an interrupted build
scores again, from the candidates' cached sets.

Deviation from the paper: our default target model is a 135M model that rarely solves GSM8K,
so `self` leans on rationalisation and the ground-truth fallback; the manifest counts each path
so this is visible, and `--self-fallback drop` keeps only the model's own correct answers.

CLI: python sources.py --source self --task gsm8k --n-train 128 builds (or reuses) a set;
python sources.py show --source self --n-train 128 --n 2 prints its first examples as they are
trained on, the trained tokens marked (data.show).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import fast
import tasks
from data import render, show
from devices import best_device
from fileio import (DefaultsHelpFormatter, append_records, check_at_least_one, check_input_file, check_output_folder,
                    exclusive_lock, progress_bar, read_json_rows, write_json_atomic, write_jsonl_atomic)
from generation import check_sampling, generate_responses
from grading import answers_match, extract_answer
from model import Transformer
from nll import example_nlls, render_pairs
from pretrained import check_model_name, resolve_model
from tokenizer import Tokenizer

CACHE_DIR = Path(os.environ.get("ILB_SOURCES_DIR", Path(__file__).resolve().parent / "cache" / "sources"))
DEFAULT_N_TRAIN = 32
CHUNK = 8  # questions per generation chunk; the unit of resumption

# What makes a generated reply count as correct (self, rewrite, step-by-step, --filter-correct, the
# path labels); part of every generated set's cache key, so a set built under another rule is never
# reused.
ANSWER_RULE = ("the reply ended by itself (its end-of-turn token, not cut off at max_new_tokens) and "
               "its stated final answer (the last \\boxed{}, else 'Final Answer:', else '####'; not "
               "merely the last number in the text) equals the gold answer")

REWRITE_TEMPLATE = (
    "Here is a question and a reference solution.\n\nQuestion: {question}\n\n"
    "Reference solution:\n{answer}\n\n"
    "Rewrite the reference solution in your own words. Keep the same reasoning and the same "
    "final answer. End with 'Final Answer: {gold}'.")
RATIONALIZE_TEMPLATE = (
    "{prompt}\n\n(Hint: the correct final answer is {gold}. Explain step by step how to reach it, "
    "then end with 'Final Answer: {gold}'.)")
STEP_BY_STEP_TEMPLATE = (
    "Here is a question and a reference solution.\n\nQuestion: {question}\n\n"
    "Reference solution:\n{answer}\n\n"
    "Rewrite the reference solution step by step: numbered steps, one calculation or fact per step, "
    "the same reasoning and the same final answer. End with 'Final Answer: {gold}'.")
PARAPHRASE_TEMPLATE = (
    "Here is a question and an answer to it.\n\nQuestion: {question}\n\nAnswer:\n{answer}\n\n"
    "Paraphrase the answer: say the same reasoning in other words, keep every step and the same "
    "final answer, and end with 'Final Answer: <answer>'.")
MINIMUM_CHANGE_TEMPLATE = (
    "We have the question and the ground truth. Please minimally change the prediction to make it "
    "correct: change as little as possible, keep the rest of the prediction as it is, and end with "
    "'Final Answer: <answer>'.\n\nQuestion: {question}\n\nGround truth: {answer}\n\n"
    "Prediction: {prediction}\n\nMinimally changed prediction:")


# ----------------------------------------------------------------------------------------------
# The resumable JSONL


def read_partial(path: Path) -> list[dict]:
    """Records of a partial JSONL, the first one of each id. A torn last line (killed mid-write)
    is cut off the file; a damaged line or a repeated id (two builders writing at once, before
    builds were locked) is dropped from it with a warning, so only its chunk is built again."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    good = raw[: raw.rfind(b"\n") + 1]
    records, seen, damaged = [], set(), 0
    for line in good.splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            r = None
        if not isinstance(r, dict) or r.get("id") in seen:
            damaged += 1
            continue
        seen.add(r.get("id"))
        records.append(r)
    if damaged:
        print(f"warning: {path}: dropped {damaged} damaged or repeated line(s); a question left without a "
              f"record is built again", file=sys.stderr, flush=True)
        write_jsonl_atomic(path, records)
    elif len(good) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(good))
    return records


# ----------------------------------------------------------------------------------------------
# file:<path> sources


def read_file_source(path: str) -> list[dict]:
    """A JSON list, or JSONL, of objects with a question and an answer; errors name the line."""
    numbered, where = read_json_rows(path, "{question, answer}", "file source")
    out = []
    for n, row in numbered:
        q = row.get("question", row.get("input"))
        a = row.get("answer", row.get("response", row.get("output")))
        if not isinstance(q, str) or not isinstance(a, str):
            missing = "question" if not isinstance(q, str) else "answer"
            raise ValueError(f"{path}: {where} {n} has no string '{missing}' field")
        if not a.strip():
            raise ValueError(f"{path}: {where} {n} has an empty answer")
        out.append({"question": q, "answer": a, "line": n})
    return out


# ----------------------------------------------------------------------------------------------
# Building


SOURCES_HELP = ("human, self, rewrite, teacher:MODEL, minimum-change:MODEL, step-by-step:MODEL, "
                "paraphrase:MODEL, file:PATH or familiar:SRC1,SRC2,... (per question the correct response "
                "with the lowest untuned perplexity among those sources')")
MODEL_SOURCES = ("teacher", "minimum-change", "step-by-step", "paraphrase")  # <kind>:<another model>


def source_kind(source: str) -> tuple[str, str | None]:
    kind, _, arg = source.partition(":")
    if kind not in ("human", "self", "rewrite", "file", "familiar") + MODEL_SOURCES:
        raise ValueError(f"unknown source '{source}' (use {SOURCES_HELP})")
    if kind in MODEL_SOURCES + ("file", "familiar") and not arg:
        raise ValueError(f"source '{kind}' needs an argument: "
                         f"{kind}:{ {'file': 'PATH', 'familiar': 'SRC1,SRC2,...'}.get(kind, 'MODEL')}")
    if kind == "familiar":
        familiar_candidates(arg)  # a bad list fails here, before anything is built
    return kind, arg or None


def file_fingerprint(path: str, what: str = "file source") -> str:
    check_input_file(path, what)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_inputs(source, model, task, n_train, seed, gen, train_questions=None, allow_unmatched=False,
                 split="train", n_val=None) -> dict:
    """Everything that determines a training set; its hash names the cache folder. The question
    options (a --train-questions file, the validation split) enter the key only when used, so a
    set built without them keeps the name it always had."""
    kind, arg = source_kind(source)
    generated = kind not in ("human", "file")
    inputs = {"source": source, "model": model, "task": task, "n_train": n_train, "seed": seed,
              "generation": gen if generated else None,
              "templates": {"self": RATIONALIZE_TEMPLATE, "rewrite": REWRITE_TEMPLATE,
                            "minimum-change": MINIMUM_CHANGE_TEMPLATE, "step-by-step": STEP_BY_STEP_TEMPLATE,
                            "paraphrase": PARAPHRASE_TEMPLATE}.get(kind)}
    if generated:
        inputs["answer_rule"] = ANSWER_RULE
    if kind == "file":
        inputs["file_sha256"] = file_fingerprint(arg)
    if train_questions is not None:  # the questions, in the file's order: its content, not its path
        inputs["train_questions_sha256"] = file_fingerprint(train_questions, "--train-questions")
        inputs["allow_unmatched"] = bool(allow_unmatched)
    if split != "train":  # the held-out questions a run's validation loss is measured on
        inputs["split"], inputs["n_val"] = split, n_val
    if kind == "familiar":  # the candidates' own cache keys (file hashes included) and the rule
        inputs["candidates"] = [{"source": c, "inputs_sha256": inputs_hash(build_inputs(
            c, model, task, n_train, seed, gen, train_questions, allow_unmatched, split, n_val))}
            for c in familiar_candidates(arg)]
        inputs["selection"] = FAMILIAR_RULE
    return inputs


def set_inputs(source, model, task, n_train, seed, dtype, train_questions=None, allow_unmatched=False,
               split="train", n_val=None, **gen_overrides) -> dict:
    """build_inputs for a command line's settings: n_train None = DEFAULT_N_TRAIN, generation
    settings = default_gen's with the overrides (the dtype changes what is generated)."""
    n_train = DEFAULT_N_TRAIN if n_train is None else n_train
    return build_inputs(source, model, task, n_train, seed, default_gen(**gen_overrides, dtype=dtype),
                        train_questions, allow_unmatched, split, n_val)


def inputs_hash(inputs: dict) -> str:
    """The key of a set's inputs (the end of its cache folder's name; its manifest's inputs_sha256)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def cache_folder(inputs: dict) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", inputs["source"])[:60]
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", inputs["model"])
    return CACHE_DIR / inputs["task"] / model / f"{slug}-{inputs_hash(inputs)}"


def default_gen(**overrides) -> dict:
    """The generation settings of a build (part of its cache key): the defaults, with the
    overrides that are not None. Raises ValueError, naming the flag, for a value that cannot work."""
    # CPU-sized defaults (train.py's quick start uses them too); --preset paper raises them
    gen = {"k": 2, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 200, "batch_size": 16,
           "self_fallback": "ground_truth", "filter_correct": False}
    unknown = set(overrides) - set(gen) - {"dtype"}
    if unknown:
        raise TypeError(f"unknown generation settings: {sorted(unknown)}")
    gen.update({k: v for k, v in overrides.items() if v is not None})
    check_at_least_one(k=gen["k"], max_new_tokens=gen["max_new_tokens"], batch_size=gen["batch_size"])
    check_sampling(gen["temperature"], gen["top_p"])
    return gen


def add_generation_args(group, max_new_tokens: bool = True) -> None:
    """The flags that say how a source is generated. All of them are part of a built set's cache
    key, so train.py and perplexity.py take them too: with the same values they find the set that
    `python sources.py` built, instead of building another with the defaults."""
    group.add_argument("--k", type=int, default=None,
                       help="self: samples per question before rationalisation (default: 2)")
    group.add_argument("--temperature", type=float, default=None, help="self: sampling temperature (default: 0.7)")
    group.add_argument("--top-p", type=float, default=None, help="self: nucleus mass (default: 0.95)")
    if max_new_tokens:
        group.add_argument("--max-new-tokens", type=int, default=None, help="longest response (default: 200)")
    group.add_argument("--self-fallback", choices=["ground_truth", "drop"], default=None,
                       help="self: what to do when neither sampling nor rationalisation is correct "
                            "(drop keeps only the model's own correct answers; default: ground_truth)")
    group.add_argument("--filter-correct", action="store_true", default=None,
                       help="teacher, paraphrase: drop answers whose final answer is wrong "
                            "(default: keep all, as the paper)")
    group.add_argument("--gen-batch-size", type=int, default=None,
                       help="prompts per generation batch (sources.py --batch-size); bf16 sampling depends on the "
                            "batching, so it is part of the cache key (default: 16)")


def add_question_args(group) -> None:
    """Which training questions: the flags train.py, perplexity.py and sources.py (and its show) share."""
    group.add_argument("--train-questions", default=None, metavar="PATH",
                       help="train on the questions of this JSON/JSONL file of {question} (e.g. one of the "
                            "paper's released files), in file order, first --n-train of them; every source "
                            "then answers exactly these (default: the task's seeded shuffle)")
    group.add_argument("--allow-unmatched", action="store_true",
                       help="skip --train-questions questions that are not in the task's training split "
                            "(default: such a question is an error)")


def question_overrides(args) -> dict:
    """set_inputs / build's question options from the flags of add_question_args."""
    return {"train_questions": args.train_questions, "allow_unmatched": args.allow_unmatched}


def generation_overrides(args) -> dict:
    """default_gen's overrides from the flags of add_generation_args."""
    return {"k": args.k, "temperature": args.temperature, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "self_fallback": args.self_fallback,
            "filter_correct": args.filter_correct, "batch_size": args.gen_batch_size}


class ModelCache:
    """Load each model once per build (teacher and target may differ)."""

    def __init__(self, dtype: str, device: str | None):
        self.dtype, self.device, self.loaded = dtype, device, {}

    def get(self, name: str):
        if name not in self.loaded:
            folder = resolve_model(name)
            model = Transformer.from_pretrained(folder, self.dtype, self.device or best_device())
            self.loaded[name] = (fast.apply(model), Tokenizer.from_folder(folder))
        return self.loaded[name]


def build_chunk(kind, arg, examples, model_name, gen, seed, chunk_no, models: ModelCache) -> list[dict]:
    """Records for one chunk of questions; depends only on its inputs (so resumption is exact)."""
    base = [{"id": e.id, "question": e.question, "prompt": e.prompt, "gold": e.gold} for e in examples]
    graded = tasks.task_info(examples[0].task).kind  # how its answers are graded (grading.KINDS)
    if kind == "human":
        return [{**b, "response": e.answer, "path": "ground_truth"} for b, e in zip(base, examples)]

    def ask(name, prompts, sample: bool, salt: int) -> list[tuple[str, bool]]:
        """(reply, ended by itself) for each prompt."""
        model, tok = models.get(name)
        texts, finished = generate_responses(
            model, tok, prompts, gen["max_new_tokens"], gen["temperature"] if sample else 0.0,
            gen["top_p"] if sample else 1.0, seed=seed * 7919 + chunk_no * 31 + salt,
            batch_size=gen["batch_size"], return_finished=True)
        return list(zip(texts, finished))

    def correct(text: str, ended: bool, e) -> bool:  # ANSWER_RULE
        return ended and answers_match(extract_answer(text, graded, last_number=False), e.gold, graded)

    if kind == "self":
        k = gen["k"]
        samples = ask(model_name, [e.prompt for e in examples for _ in range(k)], True, 0)
        out, need = [], []
        for j, (b, e) in enumerate(zip(base, examples)):
            mine = samples[j * k:(j + 1) * k]
            hit = next((text for text, ended in mine if correct(text, ended, e)), None)
            out.append({**b, "response": hit, "path": "sampled" if hit else None, "samples_tried": k})
            if hit is None:
                need.append(j)
        if need:  # STaR rationalisation: answer again, knowing the answer
            hints = [RATIONALIZE_TEMPLATE.format(prompt=examples[j].prompt, gold=examples[j].gold) for j in need]
            for j, (text, ended) in zip(need, ask(model_name, hints, False, 1)):
                if correct(text, ended, examples[j]):
                    out[j].update(response=text, path="rationalized")
                elif gen["self_fallback"] == "ground_truth":
                    out[j].update(response=examples[j].answer, path="ground_truth")
                else:
                    out[j].update(path="dropped")
        return out
    if kind in ("rewrite", "step-by-step"):  # a restatement of the ground truth, kept if still correct
        name, template, label, salt = ((model_name, REWRITE_TEMPLATE, "rewritten", 2) if kind == "rewrite"
                                       else (arg, STEP_BY_STEP_TEMPLATE, "step_by_step", 6))
        prompts = [template.format(question=e.question, answer=e.answer, gold=e.gold) for e in examples]
        out = []
        for b, e, (text, ended) in zip(base, examples, ask(name, prompts, False, salt)):
            ok = correct(text, ended, e)
            out.append({**b, "response": text if ok else e.answer, "path": label if ok else "ground_truth",
                        "rewrite_attempt": None if ok else text})
        return out
    if kind in ("teacher", "paraphrase"):  # another model's answer (paraphrased by it), unfiltered by default
        answers = ask(arg, [e.prompt for e in examples], False, 3)
        if kind == "paraphrase":
            prompts = [PARAPHRASE_TEMPLATE.format(question=e.question, answer=text)
                       for e, (text, _) in zip(examples, answers)]
            replies = ask(arg, prompts, False, 7)
        else:
            replies = answers
        out = []
        for b, e, (text, ended), (answer, _) in zip(base, examples, replies, answers):
            ok = correct(text, ended, e)
            record = {**b, "teacher_answer": answer} if kind == "paraphrase" else dict(b)
            if gen["filter_correct"] and not ok:  # dropped: not trained on, kept here for the record
                out.append({**record, "response": None, "path": "dropped", "teacher_answer": answer,
                            **({"paraphrase": text} if kind == "paraphrase" else {})})
            else:
                out.append({**record, "response": text, "path": f"{kind}_correct" if ok else f"{kind}_wrong"})
        return out
    if kind == "minimum-change":
        preds = [text for text, _ in ask(model_name, [e.prompt for e in examples], False, 4)]
        prompts = [MINIMUM_CHANGE_TEMPLATE.format(question=e.prompt, answer=e.answer, prediction=p)
                   for e, p in zip(examples, preds)]
        fixed = ask(arg, prompts, False, 5)
        return [{**b, "response": f[0], "original_prediction": p,
                 "path": "corrected_correct" if correct(*f, e) else "corrected_wrong"}
                for b, e, p, f in zip(base, examples, preds, fixed)]
    raise AssertionError(kind)


def build_from_file(path: str, examples, allow_empty: bool = False) -> tuple[list[dict], dict]:
    rows = read_file_source(path)
    by_text = {}
    for r in rows:  # a question asked twice must not silently take the later answer
        first = by_text.setdefault(tasks.question_key(r["question"]), r)
        if first["answer"] != r["answer"]:
            raise ValueError(f"{path}: entries {first['line']} and {r['line']} ask the same question with different "
                             f"answers; keep one answer per question")
    out, unmatched_tasks = [], 0
    for e in examples:
        r = by_text.get(tasks.question_key(e.question))
        if r is None:
            unmatched_tasks += 1
            out.append({"id": e.id, "question": e.question, "prompt": e.prompt, "gold": e.gold,
                        "response": None, "path": "dropped"})
        else:
            out.append({"id": e.id, "question": e.question, "prompt": e.prompt, "gold": e.gold,
                        "response": r["answer"], "path": "file", "file_line": r["line"]})
    if unmatched_tasks == len(examples) and not allow_empty:
        raise ValueError(f"file source {path}: none of its {len(rows)} questions is among the {len(examples)} "
                         f"{examples[0].task} training questions (--n-train, --seed); check the task and the file")
    matched = {tasks.question_key(e.question) for e in examples}
    unmatched_lines = [r["line"] for r in rows if tasks.question_key(r["question"]) not in matched]
    return out, {"file_rows": len(rows), "questions_without_file_answer": unmatched_tasks,
                 "file_rows_not_in_task": len(unmatched_lines),
                 "file_rows_not_in_task_first": unmatched_lines[:20]}


# ----------------------------------------------------------------------------------------------
# familiar:<src>,<src>,...: per question, the correct candidate the target model finds most probable


FAMILIAR_RULE = ("per question, among the candidates whose final answer is correct (ANSWER_RULE; a "
                 "generated reply's path label records whether it ended by itself), the one with the lowest "
                 "untuned per-example perplexity of the target model (nll.example_nlls, fp32, response + "
                 "end-of-turn token); identical responses are measured once, so they tie exactly; a tie goes "
                 "to the source listed first; none correct: self_fallback (the ground truth, or dropped)")
# A comma starts a new candidate only where a source name follows it (see the module docstring).
_NEXT_SOURCE = re.compile(r",(?=(?:human|self|rewrite)(?:,|$)|(?:file|familiar|%s):)" % "|".join(MODEL_SOURCES))


def familiar_candidates(arg: str) -> list[str]:
    """The candidate sources of familiar:<arg>, checked: known kinds, none nested, no repeats, two
    or more (one alone is more likely a path whose comma was read as a separator)."""
    names = _NEXT_SOURCE.split(arg)
    for name in names:
        if name.startswith("familiar:") or name == "familiar":
            raise ValueError(f"familiar:{arg}: a familiar source cannot list another familiar source")
        source_kind(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"familiar:{arg}: {', '.join(repeated)} listed twice")
    if len(names) < 2:
        raise ValueError(f"familiar:{arg}: needs two or more sources, separated by commas "
                         f"(e.g. familiar:human,self); a comma inside a file path is kept unless a source "
                         f"name follows it")
    return names


def source_label(source: str) -> str:
    """A source as a report's table names it: a file source by its file name, not its whole path
    (file:/clone/dataset/GSM8K/openai_gpt4_data.json -> file:openai_gpt4_data.json), a familiar
    list with each of its candidates so. Reports keep the full source beside it in their JSON."""
    kind, _, arg = source.partition(":")
    if kind == "file" and arg:
        return f"file:{Path(arg).name}"
    if kind == "familiar" and arg:
        return "familiar:" + ",".join(source_label(c) for c in _NEXT_SOURCE.split(arg))
    return source


def candidate_correct(record: dict, task: str) -> bool:
    """ANSWER_RULE for a built record: its stated final answer (not merely its last number) equals
    the gold. Whether a generated reply ended by itself is not in its text; its source checked
    that and labelled a failure `<kind>_wrong`."""
    if record.get("response") is None or record["path"].endswith("_wrong"):
        return False
    graded = tasks.task_info(task).kind
    return answers_match(extract_answer(record["response"], graded, last_number=False), record["gold"], graded)


def build_familiar(arg, examples, model, task, n_train, seed, dtype, device, progress, gen,
                   gen_overrides) -> tuple[list[dict], dict]:
    names = familiar_candidates(arg)
    sets, about = [], []
    for name in names:  # each candidate set is built (or read) like any other, with the same settings
        records, manifest = build(name, model, task, n_train, seed, dtype, device, progress, **gen_overrides)
        sets.append({r["id"]: r for r in records})
        about.append({"source": name, "inputs_sha256": manifest["inputs_sha256"], "kept": manifest["kept"],
                      "counts_by_path": manifest["counts_by_path"]})
    # Every distinct (question, response) once: identical candidates tie exactly, and the forward
    # passes are not repeated.
    texts = {}
    for e in examples:
        for s in sets:
            r = s.get(e.id)
            if r is not None:
                texts.setdefault((e.id, r["response"]), e.prompt)
    keys = list(texts)
    target, tok = ModelCache("fp32", device).get(model)
    t0 = time.time()
    kept, rendered, skipped = render_pairs(tok, [(texts[k], k[1]) for k in keys], target.cfg.max_position_embeddings)
    ppl = {keys[kept[x.index]]: (x.ppl, x.tokens)
           for x in example_nlls(target, rendered, tok.pad_id, progress=progress)}
    out, chosen = [], {}
    for e in examples:
        cands = []
        for name, s in zip(names, sets):
            r = s.get(e.id)
            p, n = ppl.get((e.id, r["response"]), (None, None)) if r else (None, None)
            cands.append({"source": name, "path": r["path"] if r else "dropped",
                          "correct": r is not None and candidate_correct(r, task), "ppl": p, "tokens": n})
        # min() keeps the first of equal keys: a tie goes to the source listed first. A candidate
        # with no perplexity (longer than the model's context) cannot be compared, so never wins.
        best = min((c for c in cands if c["correct"] and c["ppl"] is not None), key=lambda c: c["ppl"],
                   default=None)
        record = {"id": e.id, "question": e.question, "prompt": e.prompt, "gold": e.gold, "candidates": cands}
        if best is not None:
            chosen[best["source"]] = chosen.get(best["source"], 0) + 1
            record.update(response=sets[names.index(best["source"])][e.id]["response"], source=best["source"],
                          path=f"chose:{best['source']}")
        elif gen["self_fallback"] == "ground_truth":
            record.update(response=e.answer, source=None, path="ground_truth")
        else:
            record.update(response=None, source=None, path="dropped")
        out.append(record)
    return out, {"candidates": about, "chosen_by_source": chosen, "candidate_responses_scored": len(rendered),
                 "candidate_responses_skipped": skipped, "scoring_seconds": round(time.time() - t0, 1)}


def get_training_set(source: str, model: str = "smollm2-135m-instruct", task: str = "gsm8k",
                     n_train: int | None = None, seed: int = 0, dtype: str = "bf16",
                     device: str | None = None, progress: bool = True, **gen_overrides) -> list[dict]:
    """Build (or reuse) the training set of `source`; returns the kept records, in question order."""
    records, _ = build(source, model, task, n_train, seed, dtype, device, progress, **gen_overrides)
    return records


def build(source, model="smollm2-135m-instruct", task="gsm8k", n_train=None, seed=0, dtype="bf16",
          device=None, progress=True, train_questions=None, allow_unmatched=False, split="train",
          n_val=None, **gen_overrides) -> tuple[list[dict], dict]:
    """Build (or reuse) `source`'s set on the task's training questions (tasks.splits: the seeded
    shuffle's first n_train, or --train-questions'), or, with split="val", on the n_val
    validation questions of the same split. Returns (kept records in question order, manifest)."""
    inputs = set_inputs(source, model, task, n_train, seed, dtype, train_questions, allow_unmatched,
                        split, n_val, **gen_overrides)
    kind, arg = source_kind(source)
    n_train, gen = inputs["n_train"], inputs["generation"]  # (generation None: human, file)
    folder = cache_folder(inputs)
    final, manifest_path = folder / "data.jsonl", folder / "manifest.json"
    built = read_cached(folder)
    if built:
        return require_kept(*built)
    damaged = final.exists() and manifest_path.exists()

    for name in [model] + ([arg] if kind in MODEL_SOURCES else []):
        check_model_name(name)  # before a cache folder is made for a model that does not exist
    chosen = tasks.splits(task, n_train=n_train, seed=seed, train_questions=train_questions,
                          allow_unmatched=allow_unmatched, **({"n_val": n_val} if split == "val" else {}))
    examples = chosen[split]
    check_output_folder(folder, "ILB_SOURCES_DIR")
    # One builder per set: two appending to one partial file, or replacing one data.jsonl, would
    # mix their records. A second builder waits, then takes the set the first one built.
    with exclusive_lock(folder.with_name(folder.name + ".lock"), f"the build of {folder}", wait=True):
        built = None if damaged else read_cached(folder)
        if built:
            return require_kept(*built)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        extra = {}
        if kind == "file":
            all_records, extra = build_from_file(arg, examples, allow_empty=split == "val")
        elif kind == "familiar":  # the candidates are built on the same questions, with the same settings
            all_records, extra = build_familiar(arg, examples, model, task, n_train, seed, dtype, device, progress,
                                                gen, {**gen_overrides, "train_questions": train_questions,
                                                      "allow_unmatched": allow_unmatched, "split": split,
                                                      "n_val": n_val})
        else:
            partial = folder / "data.partial.jsonl"
            done = read_partial(partial)
            done_ids = {r["id"] for r in done}
            models = ModelCache(dtype, device)
            chunks = [examples[i:i + CHUNK] for i in range(0, len(examples), CHUNK)]
            for chunk_no, chunk in progress_bar(enumerate(chunks), f"build {source}", "chunk", progress,
                                                total=len(chunks)):
                if all(e.id in done_ids for e in chunk):
                    continue  # built before an interruption
                # only the questions not yet on file: a kill mid-chunk leaves some of its lines behind
                append_records(partial, [r for r in build_chunk(kind, arg, chunk, model, gen, seed, chunk_no,
                                                                models) if r["id"] not in done_ids])
            all_records = read_partial(partial)
            ids = [r["id"] for r in all_records]
            if len(ids) != len(set(ids)) or set(ids) != {e.id for e in examples}:
                raise RuntimeError(f"{partial} does not hold each question exactly once; delete {folder} and rebuild")
            order = {e.id: i for i, e in enumerate(examples)}
            all_records.sort(key=lambda r: order[r["id"]])
        write_jsonl_atomic(final, all_records)
        (folder / "data.partial.jsonl").unlink(missing_ok=True)
        kept = [r for r in all_records if r["response"] is not None]
        counts: dict[str, int] = {}
        for r in all_records:
            counts[r["path"]] = counts.get(r["path"], 0) + 1
        manifest = {
            **inputs, "cache_folder": str(folder), "questions": len(all_records), "kept": len(kept),
            "coverage": round(len(kept) / max(1, len(all_records)), 4), "counts_by_path": counts,
            "build_seconds": round(time.time() - t0, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "inputs_sha256": inputs_hash(inputs), **extra,
        }
        if train_questions is not None:  # what --allow-unmatched skipped, and the file's repeats
            manifest["train_questions"] = {"path": str(train_questions), "unmatched_skipped": len(chosen["unmatched"]),
                                           "repeated_skipped": len(chosen["repeated"])}
        write_json_atomic(manifest_path, manifest)
    return require_kept(kept, manifest)


def check_buildable(source, model, task, n_train, seed, dtype, train_questions=None, allow_unmatched=False,
                    **gen_overrides) -> None:
    """ValueError now, before any model work, for a set that cannot be built: a file source with
    nothing to train on, or a sources cache that cannot be written (a set already built is only read)."""
    inputs = set_inputs(source, model, task, n_train, seed, dtype, train_questions, allow_unmatched, **gen_overrides)
    kind, arg = source_kind(source)
    if kind == "file":
        build_from_file(arg, tasks.splits(task, n_train=inputs["n_train"], seed=seed, train_questions=train_questions,
                                          allow_unmatched=allow_unmatched)["train"])
    folder = cache_folder(inputs)
    if not ((folder / "data.jsonl").exists() and (folder / "manifest.json").exists()):
        check_output_folder(folder, "ILB_SOURCES_DIR")


def read_cached(folder: Path) -> tuple[list[dict], dict] | None:
    """read_built, or None if the set is not built, or is damaged (said in one line: it is built again)."""
    if not ((folder / "data.jsonl").exists() and (folder / "manifest.json").exists()):
        return None
    try:
        return read_built(folder)
    except ValueError as e:
        print(f"warning: {e}; building it again", file=sys.stderr, flush=True)
        return None


def require_kept(kept: list[dict], manifest: dict) -> tuple[list[dict], dict]:
    """A set with no response kept (all dropped or rejected) is an error, not an empty training set.
    (A validation set may be empty: a file: source need not answer the validation questions.)"""
    if not kept and manifest.get("split", "train") == "train":
        raise ValueError(f"source {manifest['source']}: no response kept of {manifest['questions']} "
                         f"({manifest['counts_by_path']}; the records are in {manifest['cache_folder']})")
    return kept, manifest


def read_built(folder: Path) -> tuple[list[dict], dict]:
    """A finished build's kept records and manifest, checked against each other: a damaged cache
    is an error that names the folder, never a silently smaller training set."""
    damaged = f"the cached set in {folder} is damaged ({{}})"
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        lines = (folder / "data.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(damaged.format(e)) from None
    if not isinstance(manifest, dict) or len(records) != manifest.get("questions"):
        raise ValueError(damaged.format(f"{len(records)} records, the manifest says "
                                        f"{manifest.get('questions') if isinstance(manifest, dict) else '?'}"))
    kept = [r for r in records if r.get("response") is not None]
    if len(kept) != manifest.get("kept"):
        raise ValueError(damaged.format(f"{len(kept)} kept records, the manifest says {manifest.get('kept')}"))
    return kept, manifest


def load_cached(source: str, model: str, task: str, n_train: int | None = None, seed: int = 0,
                dtype: str = "bf16", train_questions=None, allow_unmatched=False) -> list[dict]:
    """A built set's kept records (default generation settings); fails if it was never built."""
    folder = cache_folder(set_inputs(source, model, task, n_train, seed, dtype, train_questions, allow_unmatched))
    if not (folder / "data.jsonl").exists() or not (folder / "manifest.json").exists():
        raise FileNotFoundError(f"source '{source}' is not built for {model}/{task}; run "
                                f"python sources.py --source {source} --task {task}")
    try:
        return read_built(folder)[0]
    except ValueError as e:
        raise ValueError(f"{e}; build it again with python sources.py --source {source} --task {task}") from None


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["show"]:
        return show_main(argv[1:])
    return build_main(argv)


def build_main(argv) -> None:
    ap = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter,
                                 description="Build a training set from one response source (cached). Subcommand: "
                                             "show (a built set's examples with the trained tokens marked).")
    ap.add_argument("--source", required=True,
                    help=SOURCES_HELP)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the target model (short name or folder)")
    ap.add_argument("--task", default="gsm8k", help="task (see tasks.py)")
    ap.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN, help="first N questions of the seeded shuffle")
    ap.add_argument("--seed", type=int, default=0, help="split and sampling seed")
    add_question_args(ap)
    g = ap.add_argument_group("generation")
    add_generation_args(g)
    g.add_argument("--batch-size", type=int, default=None,
                   help="the same as --gen-batch-size (default: --gen-batch-size's)")
    g.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                   help="generation dtype (bf16: ~2x faster on CPU; part of the cache key)")
    g.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    args = ap.parse_args(argv)
    try:
        check_at_least_one(n_train=args.n_train)  # before an empty set is built and cached
        tasks.check_seed(args.seed)
        records, manifest = build(args.source, args.model, args.task, args.n_train, args.seed, args.dtype,
                                  args.device, True, **question_overrides(args), **{**generation_overrides(args),
                                                        "batch_size": args.batch_size or args.gen_batch_size})
        tok = Tokenizer.from_folder(resolve_model(args.model))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    mean_tokens = sum(len(tok.encode(r["response"])) for r in records) / max(1, len(records))
    print(f"source {args.source}: {manifest['kept']}/{manifest['questions']} kept "
          f"(coverage {manifest['coverage']:.0%}), by path {manifest['counts_by_path']}, "
          f"mean response tokens {mean_tokens:.1f}, build {manifest['build_seconds']} s")
    print(f"cache: {manifest['cache_folder']}")
    for r in records[:2]:
        print(f"--- {r['id']} ({r['path']})\nQ: {r['question']}\nA: {r['response']}")


def show_main(argv) -> None:
    """The loss mask, visible: a built training set's first examples rendered as they are trained
    on, the trained tokens between ⟦ ⟧ (data.render and data.show). It reads the cache only."""
    ap = argparse.ArgumentParser(prog="sources.py show", formatter_class=DefaultsHelpFormatter,
                                 description="Inspect rendered training examples and their loss mask.")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="short name or HF-format folder")
    ap.add_argument("--task", default="gsm8k", help="task name (see tasks.py)")
    ap.add_argument("--source", default="human",
                    help="response source: human, or any source built by sources.py (reads its cache)")
    ap.add_argument("--n", type=int, default=2, help="how many training examples to show")
    ap.add_argument("--n-train", type=int, default=None,
                    help=f"size of the built training set to read, as built by sources.py --n-train "
                         f"(default: {DEFAULT_N_TRAIN})")
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    add_question_args(ap)
    args = ap.parse_args(argv)
    try:
        check_at_least_one(n=args.n, n_train=args.n_train)
        tasks.check_seed(args.seed)
        tok = Tokenizer.from_folder(resolve_model(args.model))
        if args.task in tasks.TASKS and not tasks.has_train(args.task):
            raise ValueError(f"--task {args.task} has no training split (it is evaluation-only); "
                             f"show one of {', '.join(t for t in tasks.TASKS if tasks.has_train(t))}")
        if args.source == "human":
            pairs = [(e.prompt, e.answer) for e in tasks.splits(
                args.task, seed=args.seed, **question_overrides(args))["train"][: args.n]]
        else:
            pairs = [(r["prompt"], r["response"]) for r in load_cached(
                args.source, args.model, args.task, n_train=args.n_train, seed=args.seed,
                **question_overrides(args))[: args.n]]
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    for k, (prompt, response) in enumerate(pairs):
        r = render(tok, prompt, response)
        print(f"=== example {k}: {len(r.ids)} tokens, {r.n_targets} trained on ===")
        print(show(tok, r))
        print()


if __name__ == "__main__":
    main()
