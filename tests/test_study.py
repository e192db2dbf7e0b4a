"""study.py: a whole (tiny) study runs, exports what it promises, skips finished stages when run
again, and refuses a folder without the paper's files."""

import json
from pathlib import Path

import pytest

import study
import tasks


@pytest.fixture
def paper_dir(tmp_path):
    """Files in the shape of the paper's dataset/GSM8K (our own words, on real GSM8K questions)."""
    import tasks
    pool = tasks.training_pool("gsm8k")[:8]
    folder = tmp_path / "GSM8K"
    folder.mkdir()
    suffix = "\n\nPlease provide the final answer (a number) at the end, after 'Final Answer:'\n"
    for name, say in [(study.QUESTIONS_FILE, "Human."), *((f, f"{k}.") for k, f in study.PAPER_FILES.items())]:
        (folder / name).write_text(json.dumps([{"question": e.question + suffix, "input": "",
                                                "answer": f"{say} Final Answer: {e.gold}"} for e in pool]))
    return folder


def test_a_tiny_study_runs_exports_and_resumes(tiny_model_dir, paper_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ILB_SOURCES_DIR", str(tmp_path / "sources"))
    monkeypatch.setitem(study.STUDIES, "tiny", dict(
        model=str(tiny_model_dir), sources=["human", "paper:gpt4"],
        train=["--n-train", "4", "--n-val", "2", "--n-test", "2", "--epochs", "1", "--batch-size", "2",
               "--micro-batch", "2", "--max-new-tokens", "4", "--lr", "1e-2", "--eval-tasks", "gsm8k", "csqa"]))
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["run", "tiny", "--paper-data", str(paper_dir), "--work", str(work), "--out", str(out)]
    study.main(argv)
    state = json.loads((work / "study.json").read_text())
    assert set(state["stages"]) == {"train human", "train paper:gpt4", "report and export"}
    assert "--train-questions" in state["stages"]["train paper:gpt4"]["command"]
    results = json.loads((out / "results.json").read_text())
    assert results["n"]["paper:gpt4"] == {"train": 4, "validation": 2, "test": {"gsm8k": 2, "csqa": 2}}
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 * (2 + 2)  # two sources, two tasks, two test questions
    assert all(a["gold_loglik"] is not None for a in answers if a["task"] == "csqa")
    assert (out / "adapters" / "paper-gpt4" / "adapter_model.safetensors").is_file()
    assert "vs human" in (out / "report.md").read_text()
    first = (work / "runs" / "human" / "results.json").read_bytes()
    study.main(argv)  # everything done: nothing is trained again
    assert (work / "runs" / "human" / "results.json").read_bytes() == first
    assert json.loads((work / "study.json").read_text())["stages"]["train human"] == state["stages"]["train human"]
    # export while a source is still to run: the finished ones only, and which are missing
    finished = work / "runs" / "paper-gpt4" / "results.json"
    finished.rename(finished.with_name("results.json.away"))
    partial = tmp_path / "partial"
    study.main(["export", "tiny", "--work", str(work), "--out", str(partial)])
    assert json.loads((partial / "results.json").read_text())["missing"] == ["paper:gpt4"]
    assert "openai_gpt4" not in (partial / "report.md").read_text() and not (partial / "adapters" / "paper-gpt4").exists()
    assert "report and export (partial)" in json.loads((work / "study.json").read_text())["stages"]
    finished.with_name("results.json.away").rename(finished)
    study.main(["export", "tiny", "--work", str(work), "--out", str(partial)])
    assert json.loads((partial / "results.json").read_text())["missing"] == []
    assert "report and export (partial)" not in json.loads((work / "study.json").read_text())["stages"]


def test_a_folder_without_the_paper_files_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no groundtruth.json.*clone"):
        study.main(["run", "study1", "--paper-data", str(tmp_path), "--work", str(tmp_path / "w")])


def test_a_familiar_list_maps_each_paper_candidate_to_its_file():
    paper = Path("/clone/dataset/GSM8K")
    assert study.source_arg("familiar:human,paper:gpt4,paper:claude,self", paper) == (
        "familiar:human,file:/clone/dataset/GSM8K/openai_gpt4_data.json,"
        "file:/clone/dataset/GSM8K/anthropic_Claud.json,self")
    assert study.run_name("familiar:human,paper:gpt4,paper:claude,self") == "familiar"
    assert study.run_name("paper:minimum-change") == "paper-minimum-change"


STAGE = r"""
import sys, time
source, folder = sys.argv[1], sys.argv[2]
with open(folder + "/events", "a") as f:
    f.write(f"start {source}\n")
if source == "bad":
    sys.exit(3)
time.sleep(0.6)
with open(folder + "/events", "a") as f:
    f.write(f"end {source}\n")
"""


def test_jobs_runs_at_most_that_many_stages_at_once_and_starts_none_after_a_failure(tmp_path, monkeypatch):
    """Five stages, two at a time, the fourth failing at once: a, b run together, then c and bad;
    after bad fails, d never starts, c still finishes and is recorded; bad and d are not."""
    import sys
    monkeypatch.setattr(study, "train_command", lambda st, source, *a: [sys.executable, "-c", STAGE, source,
                                                                        str(tmp_path)])
    (tmp_path / "logs").mkdir()
    state, state_path = {"stages": {}}, tmp_path / "study.json"
    failed = study.run_stages(["a", "b", "c", "bad", "d"], {}, tmp_path, tmp_path, [], 2, state, state_path)
    assert failed == ["train bad failed (exit 3)"]
    events = (tmp_path / "events").read_text().split("\n")[:-1]
    running, most = 0, 0
    for e in events:
        running += 1 if e.startswith("start") else -1
        most = max(most, running)
        if e == "start bad":
            running -= 1  # it exits at once, writing no "end"
    assert set(events[:2]) == {"start a", "start b"}  # started together: either may write first
    assert most == 2 and "start d" not in events and "end c" in events
    assert set(json.loads(state_path.read_text())["stages"]) == {"train a", "train b", "train c"}
    assert json.loads(state_path.read_text())["stages"]["train a"]["jobs"] == 2


LONG_STAGE = r"""
import signal, sys, time
source, folder = sys.argv[1], sys.argv[2]

def stopped(*_):
    with open(folder + "/events", "a") as f:
        f.write(f"stopped {source}\n")
    sys.exit(143)
signal.signal(signal.SIGTERM, stopped)
with open(folder + "/events", "a") as f:
    f.write(f"start {source}\n")
time.sleep(60)
"""


def test_an_interrupted_study_stops_its_training_processes(tmp_path, monkeypatch):
    """Ctrl-C reaching the study alone (kill -INT to its process): both running stages are stopped
    and have exited before the study does; no stage is recorded."""
    import sys
    import time as real_time
    monkeypatch.setattr(study, "train_command", lambda st, source, *a: [sys.executable, "-c", LONG_STAGE, source,
                                                                        str(tmp_path)])
    events, real_sleep = tmp_path / "events", real_time.sleep

    interrupts = []

    def sleep(seconds):  # one Ctrl-C, in the study's polling sleep, once both stages are under way
        if not interrupts and events.exists() and events.read_text().count("start") == 2:
            interrupts.append(1)
            raise KeyboardInterrupt
        real_sleep(min(seconds, 0.05))
    monkeypatch.setattr(study.time, "sleep", sleep)
    (tmp_path / "logs").mkdir()
    state, state_path = {"stages": {}}, tmp_path / "study.json"
    started = real_time.time()
    with pytest.raises(KeyboardInterrupt):
        study.run_stages(["a", "b", "c"], {}, tmp_path, tmp_path, [], 2, state, state_path)
    assert real_time.time() - started < 30  # stopped, not waited out (each sleeps 60 s)
    lines = set(events.read_text().split("\n")[:-1])
    assert lines == {"start a", "start b", "stopped a", "stopped b"}
    assert state["stages"] == {} and not state_path.exists()


def test_status_says_where_each_run_stands(tmp_path, monkeypatch, capsys):
    """Hand-made run folders in each state: what `status` prints for them."""
    import os
    monkeypatch.setitem(study.STUDIES, "tiny", dict(model="m", sources=["human", "paper:gpt4", "self", "rewrite",
                                                                       "paper:claude"], train=[]))
    runs = tmp_path / "work" / "runs"
    config = {"epochs": 3, "task": "gsm8k", "eval_tasks": ["gsm8k", "csqa", "piqa", "boolq"],
              "n_test": 2}
    epoch_row = json.dumps({"epoch": 1, "val_accuracy": 0.1}) + "\n"
    for name, epochs in (("human", 3), ("paper-gpt4", 3), ("self", 1), ("rewrite", 0)):
        (runs / name / "checkpoint").mkdir(parents=True)
        (runs / name / "config.json").write_text(json.dumps(config))
        (runs / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + epoch_row * epochs)
    (runs / "human" / "results.json").write_text(json.dumps({"task": "gsm8k", "test": {"gsm8k": {"accuracy": 0.25}}}))
    (runs / "paper-gpt4" / "adapter").mkdir()
    (runs / "paper-gpt4" / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    def answers(ids):
        return "".join(json.dumps({"id": i, "correct": True}) + "\n" for i in ids)
    first_two = {task: [e.id for e in tasks.splits(task)["test"][:2]] for task in config["eval_tasks"]}
    for task in config["eval_tasks"]:
        (runs / "paper-gpt4" / f"eval-{task}.jsonl").write_text(answers(first_two[task]))
    os.utime(runs / "paper-gpt4" / "eval-csqa.jsonl", (0, 0))  # older than the adapter: another adapter's
    (runs / "paper-gpt4" / "eval-boolq.jsonl").write_text(answers(first_two["boolq"][:1]))  # cut off: 1 of 2
    (runs / "base-m-n2").mkdir()
    (runs / "base-m-n2" / "results.json").write_text(json.dumps({"test": {"gsm8k": {}, "csqa": {}}}))
    study.main(["status", "tiny", "--work", str(tmp_path / "work")])
    assert capsys.readouterr().out.splitlines() == [
        "untuned model  2 task(s) scored (base-m-n2)",
        "human          done: gsm8k 25.0%",
        "paper:gpt4     trained; testing: 2 of 4 tasks answered (gsm8k, piqa)",
        "self           training: 1 of 3 epochs finished",
        "rewrite        training: 0 of 3 epochs finished",
        "paper:claude   not started"]
    with pytest.raises(SystemExit, match="no work folder"):
        study.main(["status", "tiny", "--work", str(tmp_path / "elsewhere")])


def test_kill_stops_the_study_and_its_training_processes(paper_dir, tmp_path):
    """A plain `kill` (SIGTERM) of `study.py run`, as a session's end sends it: the running stages
    are stopped before the study exits (with one line saying how to continue), not left running."""
    import signal
    import subprocess
    import sys
    import time
    root = Path(study.__file__).resolve().parent
    driver = (f"import sys; sys.path.insert(0, {str(root)!r}); import study\n"
              f"study.STUDIES['tiny'] = dict(model='m', sources=['a', 'b'], train=[])\n"
              f"study.train_command = lambda st, source, *a: [sys.executable, '-c', {LONG_STAGE!r}, source, "
              f"{str(tmp_path)!r}]\n"
              f"study.main(['run', 'tiny', '--paper-data', {str(paper_dir)!r}, '--work', {str(tmp_path / 'w')!r}, "
              f"'--jobs', '2'])\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = tmp_path / "events"
    deadline = time.time() + 60
    while not (events.exists() and events.read_text().count("start") == 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=40)
    assert proc.returncode == 1 and err.strip().splitlines()[-1] == "interrupted: run the same command again to continue"
    assert set(events.read_text().split("\n")[:-1]) == {"start a", "start b", "stopped a", "stopped b"}


def test_the_paper_study_runs_train_py_in_the_papers_setting(tmp_path):
    """What `study.py run paper` hands train.py parses to the paper's setting (the preset is not
    overridden by a study flag): 1000 examples, LoRA q/v r8 alpha 16, batch 30, lr 2e-4, 10
    epochs, 100 validation questions, every test question, answers up to 512 tokens."""
    import train
    paper = tmp_path / "GSM8K"
    cmd = study.train_command(study.STUDIES["paper"], "paper:gpt4", paper, tmp_path / "w", [])
    args = train.parse_args(cmd[2:])
    assert (args.n_train, args.n_val, args.n_test, args.epochs, args.batch_size, args.lr) == (1000, 100, None, 10, 30, 2e-4)
    assert (args.lora_r, args.lora_alpha, args.lora_targets, args.max_new_tokens) == (8, 16, "q_proj,v_proj", 512)
    assert args.source == [f"file:{paper / 'openai_gpt4_data.json'}"]
    assert args.train_questions == str(paper / "groundtruth.json") and args.resume


def test_model_override_goes_to_every_run_and_may_not_change_in_a_work_folder(paper_dir, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(study, "run_stages", lambda todo, s, *a: seen.append(
        [study.train_command(s, src, paper_dir, tmp_path, []) for src in todo]) or ["stop here"])
    work = tmp_path / "w"
    with pytest.raises(SystemExit, match="stop here"):
        study.main(["run", "paper", "--paper-data", str(paper_dir), "--work", str(work), "--model", "/models/m7b"])
    assert len(seen[0]) == 5 and all(c[c.index("--model") + 1] == "/models/m7b" for c in seen[0])
    assert json.loads((work / "study.json").read_text())["model"] == "/models/m7b"
    with pytest.raises(SystemExit, match="holds this study with the model /models/m7b, not qwen2.5-coder"):
        study.main(["run", "paper", "--paper-data", str(paper_dir), "--work", str(work)])
