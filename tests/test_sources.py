"""sources.py: every source built for real on SmolLM2 + GSM8K at tiny n; caching, resumption and
file-source errors."""

import json

import pytest

import fileio
import sources

GEN = dict(max_new_tokens=24, batch_size=8, k=2)  # tiny, so real generation takes seconds


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch, smollm2_dir):
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "sources")


@pytest.mark.parametrize("source", ["human", "self", "rewrite", "teacher:smollm2-135m-instruct",
                                    "minimum-change:smollm2-135m-instruct", "step-by-step:smollm2-135m-instruct",
                                    "paraphrase:smollm2-135m-instruct"])
def test_each_source_builds_on_the_same_questions(source):
    records, manifest = sources.build(source, n_train=3, progress=False, **GEN)
    human, _ = sources.build("human", n_train=3, progress=False)
    assert [r["id"] for r in records] == [r["id"] for r in human]  # same questions, same order
    assert manifest["questions"] == 3 and sum(manifest["counts_by_path"].values()) == 3
    assert all(isinstance(r["response"], str) and r["response"] for r in records)
    allowed = {"human": {"ground_truth"}, "self": {"sampled", "rationalized", "ground_truth"},
               "rewrite": {"rewritten", "ground_truth"}, "step-by-step": {"step_by_step", "ground_truth"},
               "paraphrase": {"paraphrase_correct", "paraphrase_wrong"}}.get(source.split(":")[0])
    if allowed:
        assert set(manifest["counts_by_path"]) <= allowed
    if source.startswith("minimum-change"):
        assert all("original_prediction" in r for r in records)
    if source.startswith("paraphrase"):
        assert all(r["teacher_answer"] for r in records)
    folder = manifest["cache_folder"]
    on_disk = json.loads(open(f"{folder}/manifest.json").read())
    assert on_disk["inputs_sha256"] == manifest["inputs_sha256"] and on_disk["source"] == source


def test_cache_is_reused_and_changed_inputs_rebuild(monkeypatch):
    first, m1 = sources.build("self", n_train=2, progress=False, **GEN)
    monkeypatch.setattr(sources, "build_chunk", lambda *a, **k: pytest.fail("rebuilt a cached set"))
    again, m2 = sources.build("self", n_train=2, progress=False, **GEN)
    assert again == first and m2 == m1
    with pytest.raises(pytest.fail.Exception):  # a different seed is a different set
        sources.build("self", n_train=2, seed=1, progress=False, **GEN)


def test_interrupted_build_resumes_without_loss_or_duplicates(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "CHUNK", 1)
    real = sources.build_chunk
    calls = []

    def dies_on_third(kind, arg, examples, *a, **k):
        calls.append(examples[0].id)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(kind, arg, examples, *a, **k)

    monkeypatch.setattr(sources, "build_chunk", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        sources.build("self", n_train=4, progress=False, **GEN)
    monkeypatch.setattr(sources, "build_chunk", lambda *a, **k: (calls.append(a[2][0].id), real(*a, **k))[1])
    resumed, manifest = sources.build("self", n_train=4, progress=False, **GEN)
    assert calls[3:] == calls[2:3] + [resumed[3]["id"]]  # only the unfinished chunks ran again
    assert [r["id"] for r in resumed] == [r["id"] for r in sources.build("human", n_train=4, progress=False)[0]]
    # identical to an uninterrupted build
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "fresh")
    monkeypatch.setattr(sources, "build_chunk", real)
    straight, _ = sources.build("self", n_train=4, progress=False, **GEN)
    assert straight == resumed


def paper_file(tmp_path, rows, jsonl=False):
    path = tmp_path / ("f.jsonl" if jsonl else "f.json")
    path.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    return path


def test_file_source_matches_paper_format(tmp_path):
    human, _ = sources.build("human", n_train=3, progress=False)
    suffix = " Please provide the final answer (a number) at the end, after 'Final Answer:'"
    rows = [{"question": r["question"] + suffix, "input": "", "answer": f"GPT-4 says... Final Answer: {r['gold']}"}
            for r in human[:2]] + [{"question": "Not a GSM8K question at all?", "input": "", "answer": "1"}]
    records, manifest = sources.build(f"file:{paper_file(tmp_path, rows)}", n_train=3, progress=False)
    assert [r["id"] for r in records] == [r["id"] for r in human[:2]]
    assert manifest["questions_without_file_answer"] == 1 and manifest["file_rows_not_in_task"] == 1
    assert manifest["file_rows_not_in_task_first"] == [3]


@pytest.mark.parametrize("content,needle", [
    ('{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n', r"f.jsonl:2: invalid JSON"),
    ('{"question": "a", "answer": "b"}\n{"question": "c"}\n', r"line 2 has no string 'answer'"),
    ("", "the file is empty"),
    ("\n\n", "the file is empty"),
])
def test_malformed_file_source_is_one_clear_line(tmp_path, content, needle):
    path = tmp_path / "f.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=needle) as e:
        sources.build(f"file:{path}", n_train=2, progress=False)
    assert "\n" not in str(e.value)


def test_file_source_that_is_binary_or_a_folder(tmp_path):
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe[1]")
    with pytest.raises(ValueError, match="bin.json: not UTF-8 text"):
        sources.build(f"file:{tmp_path / 'bin.json'}", n_train=2, progress=False)
    with pytest.raises(ValueError, match="is a folder; give the JSON or JSONL file in it"):
        sources.build(f"file:{tmp_path}", n_train=2, progress=False)


def test_unknown_source_and_cli_error(capsys):
    with pytest.raises(ValueError, match="unknown source 'gpt4'"):
        sources.build("gpt4", n_train=2)
    with pytest.raises(SystemExit) as e:
        sources.main(["--source", "file:/nonexistent.json", "--n-train", "2"])
    assert "error: file source /nonexistent.json does not exist" in str(e.value)


def scripted_generation(monkeypatch, reply):
    """Generation replaced by `reply(prompt, sampling) -> (text, ended by itself)`; no model loads.
    Returns the list of (model name, prompt) the generation calls receive."""
    asked = []  # (model name, prompt) of every generation call
    monkeypatch.setattr(sources.ModelCache, "get", lambda self, name: (name, None))

    def fake(model, tok, prompts, max_new_tokens, temperature, top_p, seed, batch_size, return_finished):
        assert return_finished
        asked.extend((model, p) for p in prompts)
        texts, ended = zip(*[reply(p, temperature > 0) for p in prompts])
        return list(texts), list(ended)

    monkeypatch.setattr(sources, "generate_responses", fake)
    return asked


def test_only_finished_replies_that_state_the_answer_count_as_correct(monkeypatch):
    """A cut-off reply, or one that merely mentions the (hinted) number, is not kept as correct."""
    questions = sources.build("human", n_train=4, progress=False)[0]
    gold = {r["prompt"]: r["gold"] for r in questions}
    scripts = [  # per question: (sampled reply, rationalised reply); text gets the gold number
        (("So. Final Answer: {g}", True), None),  # sampled, stated, finished: kept
        (("It is {g} apples, I think", True), ("The answer is {g} because", False)),  # no statement; cut off
        (("Final Answer: {g}", False), ("Adding up: $\\boxed{{{g}}}$", True)),  # cut off; then stated in a box
        (("Final Answer: 0.5", True), ("The hint says {g}, so that is it.", True)),  # wrong; echo only
    ]
    by_prompt = {r["prompt"]: s for r, s in zip(questions, scripts)}

    def reply(prompt, sampling):
        own = next(p for p in by_prompt if p in prompt)  # a hint prompt contains the question's prompt
        text, ended = by_prompt[own][0 if sampling else 1]
        return text.format(g=gold[own]), ended

    scripted_generation(monkeypatch, reply)
    records, manifest = sources.build("self", n_train=4, progress=False, k=1)
    assert [r["path"] for r in records] == ["sampled", "ground_truth", "rationalized", "ground_truth"]
    assert records[0]["response"] == f"So. Final Answer: {questions[0]['gold']}"
    assert records[1]["response"] == questions[1]["response"] and records[3]["response"] == questions[3]["response"]
    assert manifest["answer_rule"] == sources.ANSWER_RULE  # the rule is in the cache key
    assert "answer_rule" not in sources.build("human", n_train=4, progress=False)[1]


def test_filter_correct_drops_wrong_teacher_answers(monkeypatch):
    questions = sources.build("human", n_train=2, progress=False)[0]
    right = {questions[0]["prompt"]: f"Final Answer: {questions[0]['gold']}"}
    scripted_generation(monkeypatch, lambda p, s: (right.get(p, "Final Answer: 0.5"), True))
    kept, manifest = sources.build("teacher:smollm2-135m-instruct", n_train=2, progress=False,
                                   filter_correct=True)
    assert [r["id"] for r in kept] == [questions[0]["id"]]
    assert manifest["counts_by_path"] == {"teacher_correct": 1, "dropped": 1} and manifest["kept"] == 1
    every, manifest = sources.build("teacher:smollm2-135m-instruct", n_train=2, progress=False)
    assert len(every) == 2 and manifest["counts_by_path"] == {"teacher_correct": 1, "teacher_wrong": 1}


def test_rewrite_keeps_only_finished_restatements_of_the_gold_answer(monkeypatch):
    questions = sources.build("human", n_train=3, progress=False)[0]
    scripts = [("Restated: it is {g}.\nFinal Answer: {g}", True),  # kept
               ("Restated: Final Answer: {g}", False),  # cut off
               ("Restated: Final Answer: 99999", True)]  # a wrong statement
    assert all(q["gold"] != "99999" for q in questions)

    def reply(prompt, sampling):
        i = next(i for i, q in enumerate(questions) if q["question"] in prompt)
        assert not sampling and questions[i]["response"] in prompt  # the rewriter sees the human answer
        return scripts[i][0].format(g=questions[i]["gold"]), scripts[i][1]

    scripted_generation(monkeypatch, reply)
    records, manifest = sources.build("rewrite", n_train=3, progress=False)
    assert [r["path"] for r in records] == ["rewritten", "ground_truth", "ground_truth"]
    assert records[0]["response"] == scripts[0][0].format(g=questions[0]["gold"])
    assert records[0]["rewrite_attempt"] is None
    for i in (1, 2):  # the human answer is trained on; the rejected attempt stays on record
        assert records[i]["response"] == questions[i]["response"]
        assert records[i]["rewrite_attempt"] == scripts[i][0].format(g=questions[i]["gold"])
    assert manifest["counts_by_path"] == {"rewritten": 1, "ground_truth": 2}


OTHER = "qwen2.5-coder-0.5b-instruct"  # the other model of a <kind>:MODEL source (nothing loads)


def test_step_by_step_is_a_checked_restatement_by_the_other_model(monkeypatch):
    questions = sources.build("human", n_train=2, progress=False)[0]

    def reply(prompt, sampling):
        i = next(i for i, q in enumerate(questions) if q["question"] in prompt)
        return (f"1. Start.\n2. So Final Answer: {questions[0]['gold']}", True) if i == 0 else ("1. Start.", False)

    asked = scripted_generation(monkeypatch, reply)
    records, manifest = sources.build(f"step-by-step:{OTHER}", n_train=2, progress=False)
    assert [name for name, _ in asked] == [OTHER, OTHER]  # MODEL writes it, not the target model
    assert all("step by step" in p and questions[i]["response"] in p for i, (_, p) in enumerate(asked))
    assert [r["path"] for r in records] == ["step_by_step", "ground_truth"]
    assert records[0]["response"] == f"1. Start.\n2. So Final Answer: {questions[0]['gold']}"
    assert records[1]["response"] == questions[1]["response"] and records[1]["rewrite_attempt"] == "1. Start."
    assert manifest["templates"] == sources.STEP_BY_STEP_TEMPLATE  # in the cache key


def test_paraphrase_rephrases_the_other_models_own_answer(monkeypatch):
    """The verdict is on the paraphrase, not on the answer it rephrases: question 0's answer is
    right and its paraphrase wrong, question 1's the other way round."""
    questions = sources.build("human", n_train=2, progress=False)[0]
    plain = [q["prompt"] for q in questions]
    answer = [f"Answer 0: Final Answer: {questions[0]['gold']}", "Answer 1: Final Answer: 0.5"]
    paraphrase = ["In other words, answer 0: Final Answer: 0.5",
                  f"In other words, answer 1: Final Answer: {questions[1]['gold']}"]

    def reply(prompt, sampling):
        if prompt in plain:  # the model answers first, as teacher:<model> would
            return answer[plain.index(prompt)], True
        i = next(i for i in range(2) if answer[i] in prompt)  # then paraphrases that answer
        return paraphrase[i], True

    asked = scripted_generation(monkeypatch, reply)
    records, manifest = sources.build(f"paraphrase:{OTHER}", n_train=2, progress=False)
    assert {name for name, _ in asked} == {OTHER} and len(asked) == 4  # MODEL answers and paraphrases
    assert [r["path"] for r in records] == ["paraphrase_wrong", "paraphrase_correct"]  # unfiltered by default
    assert [r["response"] for r in records] == paraphrase and [r["teacher_answer"] for r in records] == answer
    assert manifest["templates"] == sources.PARAPHRASE_TEMPLATE  # in the cache key
    kept, manifest = sources.build(f"paraphrase:{OTHER}", n_train=2, progress=False, filter_correct=True)
    assert [r["id"] for r in kept] == [questions[1]["id"]]
    assert manifest["counts_by_path"] == {"dropped": 1, "paraphrase_correct": 1}
    on_disk = [json.loads(line) for line in open(f"{manifest['cache_folder']}/data.jsonl")]
    assert on_disk[0]["response"] is None and on_disk[0]["path"] == "dropped"  # not trained on, kept on record
    assert (on_disk[0]["teacher_answer"], on_disk[0]["paraphrase"]) == (answer[0], paraphrase[0])


def test_self_fallback_drop_trains_on_no_ground_truth(monkeypatch):
    scripted_generation(monkeypatch, lambda p, s: ("Final Answer: 0.5", True))  # always wrong
    with pytest.raises(ValueError, match=r"source self: no response kept of 2 \(\{'dropped': 2\}") as e:
        sources.build("self", n_train=2, progress=False, k=2, self_fallback="drop")
    manifest = json.loads((sources.Path(str(e.value).split("records are in ")[1][:-1]) / "manifest.json").read_text())
    assert manifest["kept"] == 0 and manifest["coverage"] == 0  # built and kept on record, not trained on
    with pytest.raises(ValueError, match="no response kept"):  # the cached set is the same error
        sources.build("self", n_train=2, progress=False, k=2, self_fallback="drop")
    kept, manifest = sources.build("self", n_train=2, progress=False, k=2)  # the default falls back
    assert manifest["counts_by_path"] == {"ground_truth": 2}
    assert [r["response"] for r in kept] == [r["response"] for r in sources.build("human", n_train=2, progress=False)[0]]


def test_minimum_change_corrects_the_models_own_prediction(monkeypatch):
    questions = sources.build("human", n_train=2, progress=False)[0]
    plain = [q["prompt"] for q in questions]
    corrector_prompts = {}

    def reply(prompt, sampling):
        if prompt in plain:  # the student's own first attempt
            return f"My try for question {plain.index(prompt)}: Final Answer: 1", True
        i = next(i for i in range(2) if f"My try for question {i}:" in prompt)
        corrector_prompts[i] = prompt
        return (f"Fixed. Final Answer: {questions[0]['gold']}", True) if i == 0 else ("Fixed. Final Answer: 0.5", True)

    scripted_generation(monkeypatch, reply)
    records, manifest = sources.build("minimum-change:smollm2-135m-instruct", n_train=2, progress=False)
    assert [r["original_prediction"] for r in records] == [f"My try for question {i}: Final Answer: 1" for i in range(2)]
    assert [r["response"] for r in records] == [f"Fixed. Final Answer: {questions[0]['gold']}", "Fixed. Final Answer: 0.5"]
    assert [r["path"] for r in records] == ["corrected_correct", "corrected_wrong"]
    for i, q in enumerate(questions):  # the corrector saw the question, the gold answer and the prediction
        assert q["prompt"] in corrector_prompts[i] and q["response"] in corrector_prompts[i]


def test_generate_responses_tells_which_replies_were_cut_off(monkeypatch, smollm2_dir):
    import generation
    from tokenizer import Tokenizer
    tok = Tokenizer.from_folder(smollm2_dir)
    # generate() returns the new ids without the stop token: a full-length row never stopped
    monkeypatch.setattr(generation, "generate", lambda m, prompts, n, *a, **k: [[72] * n, [72] * (n - 1), []][:len(prompts)])
    texts, ended = generation.generate_responses(None, tok, ["a", "b", "c"], 5, batch_size=3, return_finished=True)
    assert ended == [False, True, True] and len(texts) == 3


def test_train_and_perplexity_find_the_set_sources_built(monkeypatch, tiny_model_dir):
    """The generation flags reach the build from every command line (they are in the cache key)."""
    import perplexity
    import train
    flags = ["--k", "3", "--temperature", "0.5", "--top-p", "0.9", "--self-fallback", "drop", "--filter-correct",
             "--gen-batch-size", "8"]
    want = dict(k=3, temperature=0.5, top_p=0.9, self_fallback="drop", filter_correct=True, batch_size=8)
    got = sources.generation_overrides(train.parse_args(flags + ["--max-new-tokens", "64"]))
    assert got == {**want, "max_new_tokens": 64}
    seen = {}

    def capture(name, model, task, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(sources, "get_training_set", capture)
    with pytest.raises(SystemExit, match="stop here"):
        perplexity.main(["--model", str(tiny_model_dir), "--source", "self", "--max-new-tokens", "64",
                         "--gen-dtype", "fp32", "--allow-unmatched"] + flags)
    assert seen == {"n_train": None, "seed": 0, "dtype": "fp32", **want, "max_new_tokens": 64,
                    "train_questions": None, "allow_unmatched": True}


@pytest.mark.parametrize("flag,value,needle", [("--k", "0", "--k must be at least 1"),
                                               ("--top-p", "0", "--top-p must be in (0, 1]"),
                                               ("--temperature", "-1", "--temperature must be a finite number"),
                                               ("--max-new-tokens", "0", "--max-new-tokens must be at least 1")])
def test_bad_generation_settings_are_one_line_errors(flag, value, needle, tmp_path):
    import train
    for main in (sources.main, train.main):
        with pytest.raises(SystemExit) as e:
            main(["--source", "self", flag, value] + (["--runs-dir", str(tmp_path)] if main is train.main else []))
        assert needle in str(e.value)
    assert not any(tmp_path.iterdir())  # train.py stopped before writing anything


@pytest.mark.parametrize("damage", ["torn last line", "empty", "not json"])
def test_a_damaged_cached_set_is_said_and_built_again(damage, capsys):
    records, manifest = sources.build("human", n_train=4, progress=False)
    data = sources.Path(manifest["cache_folder"]) / "data.jsonl"
    raw = data.read_bytes()
    data.write_bytes({"torn last line": raw[:-40], "empty": b"", "not json": b"\xff" + raw}[damage])
    assert sources.build("human", n_train=4, progress=False)[0] == records
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "is damaged" in warning[0] and "building it again" in warning[0]
    assert data.read_bytes() == raw
    data.write_bytes(b"")  # where it cannot be rebuilt (sources.py show reads the cache), an error
    with pytest.raises(ValueError, match="is damaged .*build it again with python sources.py"):
        sources.load_cached("human", "smollm2-135m-instruct", "gsm8k", n_train=4)


def test_write_json_atomic_leaves_no_temp_file_when_it_fails(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError):
        fileio.write_json_atomic(tmp_path / "out", {"a": 1})  # the target is a folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("source,model", [("human", "nosuch"), ("teacher:nosuch", "smollm2-135m-instruct"),
                                          ("minimum-change:nosuch", "smollm2-135m-instruct"),
                                          ("step-by-step:nosuch", "smollm2-135m-instruct"),
                                          ("paraphrase:nosuch", "smollm2-135m-instruct")])
def test_an_unknown_model_leaves_no_cache_folder(source, model, tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown model 'nosuch'"):
        sources.build(source, model, n_train=2, progress=False)
    assert not (tmp_path / "sources").exists()


# --train-questions: every source answers the questions of one file

def test_existing_sets_keep_their_cache_names():
    """Sets built without --train-questions keep the folders earlier versions gave them (names
    computed by the version before the option existed)."""
    names = {s: sources.cache_folder(sources.set_inputs(s, "smollm2-135m-instruct", "gsm8k", 32, 0, "bf16")).name
             for s in ("human", "self")}
    assert names == {"human": "human-fb932e0fcaf2a7e7", "self": "self-6a784d57f687d0ad"}


def test_train_questions_pair_every_source(tmp_path):
    import tasks
    pool = tasks.training_pool("gsm8k")
    picked = [pool[i] for i in (900, 3, 77, 41)]
    suffix = "\n\nPlease provide the final answer (a number) at the end, after 'Final Answer:'\n"
    rows = [{"question": e.question + suffix, "input": "", "answer": f"Mine. Final Answer: {e.gold}"} for e in picked]
    qfile, other = tmp_path / "q.json", tmp_path / "same-questions-other-order.json"
    qfile.write_text(json.dumps(rows))
    other.write_text(json.dumps(rows[::-1]))
    opts = dict(n_train=3, progress=False, train_questions=qfile)
    human, hm = sources.build("human", **opts)
    mine, fm = sources.build(f"file:{qfile}", **opts)
    assert [r["id"] for r in human] == [r["id"] for r in mine] == [e.id for e in picked[:3]]
    assert all(r["response"].startswith("Mine.") for r in mine)
    assert hm["train_questions"] == {"path": str(qfile), "unmatched_skipped": 0, "repeated_skipped": 0}
    # the file's CONTENT is in the key: the same questions in another order are another set
    again, m2 = sources.build("human", n_train=3, progress=False, train_questions=other)
    assert [r["id"] for r in again] == [e.id for e in picked[::-1][:3]] and m2["inputs_sha256"] != hm["inputs_sha256"]
    # validation: the file's next question, answered by the file too
    val, vm = sources.build(f"file:{qfile}", split="val", n_val=1, **opts)
    assert [r["id"] for r in val] == [picked[3].id] and val[0]["response"].startswith("Mine.")
    assert vm["inputs_sha256"] not in (fm["inputs_sha256"], hm["inputs_sha256"])


@pytest.mark.parametrize("source, label", [
    ("human", "human"), ("teacher:qwen2.5-coder-0.5b-instruct", "teacher:qwen2.5-coder-0.5b-instruct"),
    ("file:/clone/dataset/GSM8K/anthropic_Claud.json", "file:anthropic_Claud.json"),
    ("familiar:human,file:/a/b/x.json,self", "familiar:human,file:x.json,self"),
    ("familiar:file:/a,b/x.json,file:/c/y.jsonl", "familiar:file:x.json,file:y.jsonl"),
])
def test_source_label_names_a_file_by_its_file_name(source, label):
    assert sources.source_label(source) == label
