"""A whole study in one resumable command: every response source on the same questions, trained,
tested, compared and exported (issue 18 sections 5-8; the paper's section 3 experiment).

    python study.py run study1 --paper-data PATH/TO/I-Learn-Better-If-You-Speak-My-Language/dataset/GSM8K
    python study.py status study1
    python study.py export study1      # the report of the sources finished so far
    python study.py run paper --paper-data PATH --model /path/to/Mistral-7B-Instruct-v0.2 --work W --out O
                                       # the paper's setting, on a GPU (docs/gpu.md)

Stages, in order, each skipped when its result is on disk, so the command can be stopped at any
point (Ctrl-C, a killed session) and run again to continue where it was:
  1. one train.py run per source (`--resume`: a killed run continues from its last epoch), each
     in a subprocess whose output goes to <work>/logs/<source>.log; `--jobs N` runs N at once
     (each its own process: mind the cores and the memory, see --help);
  2. the comparison report (eval.py report: paired statistics, the plot);
  3. the export to docs/results/<study>/: report.md, report.json, the plot, results.json (the
     exact commands, the commit, the machine, wall time per stage, every n), answers.jsonl
     (per test question and source: output, extracted answer, correct, gold log-likelihood)
     and the adapters (a q/v rank-8 adapter of the 135M model is ~1.8 MB).
The study's own state (stage times, commands) is one JSON file written atomically after each
stage. The paper's files are read from where the user cloned them; nothing of them is copied
into the export (answers.jsonl holds OUR models' outputs on the test questions only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from eval import gold_loglik, load_answers, write_report
from fileio import DefaultsHelpFormatter, write_json_atomic, write_jsonl_atomic
from lora import ADAPTER_WEIGHTS
from runfolder import git_commit
from train import earlier_answers, eval_task_list

ROOT = Path(__file__).resolve().parent

# The paper's GSM8K files (in the authors' repository, dataset/GSM8K/) used as sources. The two
# "rewrite" files are byte-identical to the GPT-4 and Claude answer files (README), so the
# rewrite source is ours: the target model restates the ground truth.
PAPER_FILES = {"gpt4": "openai_gpt4_data.json", "claude": "anthropic_Claud.json",
               "minimum-change": "mistral_minimum_change_data.json"}
QUESTIONS_FILE = "groundtruth.json"  # its questions, in its order, are every source's questions

STUDIES = {
    # Study 1: the familiarity effect on the packaged 135M model, on this CPU. The training
    # setting is the CPU sweep's (docs/sweep/README.md).
    "study1": dict(model="smollm2-135m-instruct", sources=["human", "paper:gpt4", "paper:claude",
                                                            "paper:minimum-change", "rewrite", "self",
                                                            "familiar:human,paper:gpt4,paper:claude,self"],
                   train=["--n-train", "500", "--n-val", "50", "--n-test", "500", "--epochs", "3",
                          "--lr", "3e-3", "--batch-size", "8", "--micro-batch", "8", "--dtype", "bf16",
                          "--eval-tasks", "gsm8k", "csqa", "piqa", "boolq", "mmlu"]),
    # Study 2: a model that can do the task. Its answers are long: with study 1's 200 new tokens, 390
    # of its 500 untuned GSM8K test answers were cut off (15.8% solved; 39% of those that ended), and
    # its self set kept 58 of 500 own answers. So answers may run to 512 tokens, the paper's preset's
    # limit (16 untuned answers measured at up to 768 all ended within 445). Sized on this CPU (2
    # cores, one thread a process, two runs at once beside the self set's build; docs/LOG.md): a
    # training step of 8 examples 23-35 s (63 an epoch), 5-7 GB peak memory a process with
    # --grad-checkpoint (so two runs fit in 24 GB); ~3 h a source, two at a time; three sessions.
    "study2": dict(model="qwen2.5-coder-0.5b-instruct", sources=["human", "paper:gpt4", "paper:claude", "self"],
                   train=["--n-train", "500", "--n-val", "50", "--n-test", "500", "--epochs", "3",
                          "--lr", "3e-3", "--batch-size", "8", "--micro-batch", "8", "--dtype", "bf16",
                          "--max-new-tokens", "512", "--eval-tasks", "gsm8k", "csqa", "piqa", "boolq", "mmlu"]),
    # The paper's own setting, for a GPU (docs/gpu.md): all 1000 questions of the paper's files, the
    # `paper` preset of train.py (LoRA q/v r8, batch 30, lr 2e-4, 10 epochs with the best on 100
    # validation questions, every test question of each task), the paper's three LLM sources beside
    # human and self. Its model is the 0.5B one unless --model names another (Mistral-7B-Instruct-v0.2
    # is the paper's). Not run on this CPU: one source would take days here. The paper's files
    # answer only their 1000 questions, so its file sources have no validation loss (accuracy picks the epoch).
    "paper": dict(model="qwen2.5-coder-0.5b-instruct",
                  sources=["human", "paper:gpt4", "paper:claude", "paper:minimum-change", "self"],
                  train=["--preset", "paper", "--eval-tasks", "gsm8k", "csqa", "piqa", "boolq", "mmlu"]),
}


def source_arg(source: str, paper_data: Path) -> str:
    """train.py's --source for a study source: paper:<name> is the paper's file, as file:PATH;
    familiar:A,B,... maps each of its candidates the same way (issue 21 section 3)."""
    if source.startswith("familiar:"):
        return "familiar:" + ",".join(source_arg(c, paper_data) for c in source.split(":", 1)[1].split(","))
    if source.startswith("paper:"):
        return f"file:{paper_data / PAPER_FILES[source.split(':', 1)[1]]}"
    return source


def run_name(source: str) -> str:
    """The run folder's name: the source with ':' as '-'; a familiar list is just "familiar"."""
    return "familiar" if source.startswith("familiar:") else source.replace(":", "-")


def train_command(study: dict, source: str, paper_data: Path, work: Path, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--source", source_arg(source, paper_data),
            "--model", study["model"], "--train-questions", str(paper_data / QUESTIONS_FILE),
            *study["train"], *extra, "--runs-dir", str(work / "runs"), "--run-name", run_name(source), "--resume"]


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def export_answers(run_dirs: dict[str, Path], out: Path) -> int:
    """answers.jsonl: per test question and source, our model's output and its verdict."""
    rows = []
    for source, run_dir in run_dirs.items():
        results = json.loads((run_dir / "results.json").read_text())
        for task in results["test"]:
            for qid, r in (load_answers(run_dir, task) or {}).items():
                rows.append({"question_id": qid, "task": task, "source": source, "output": r.get("output"),
                             "extracted": r.get("extracted"), "gold": r.get("gold"), "correct": r["correct"],
                             "gold_loglik": gold_loglik(r)})
    write_jsonl_atomic(out / "answers.jsonl", rows)
    return len(rows)


def load_state(work: Path) -> tuple[Path, dict]:
    """The study's state file and what it holds so far (stage times, commands)."""
    state_path = work / "study.json"
    return state_path, json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}


def study_run_dirs(name: str, work: Path) -> dict[str, Path]:
    """Each source of the study and its run folder."""
    return {source: work / "runs" / run_name(source) for source in STUDIES[name]["sources"]}


def run_stages(todo: list[str], study: dict, paper_data: Path, work: Path, extra: list[str], jobs: int,
               state: dict, state_path: Path) -> list[str]:
    """Train the `todo` sources, up to `jobs` train.py processes at a time, in the study's order;
    each finished stage goes into the study's state at once. After a failure no new stage
    starts, the running ones finish (each is resumable anyway). Returns the failures. Stopped
    itself (Ctrl-C, kill, an error here), it first stops its train.py processes, so none
    is left running on its own, holding its run folder's lock against the next attempt."""
    waiting, running, failed = list(todo), {}, []  # running: source -> (process, command, start time)
    try:
        while waiting or running:
            while waiting and len(running) < jobs and not failed:
                source = waiting.pop(0)
                cmd = train_command(study, source, paper_data, work, extra)
                log_path = work / "logs" / f"{run_name(source)}.log"
                print(f"[study] train {source}: {shlex.join(cmd)}  (log: {log_path})", flush=True)
                with open(log_path, "a") as log:  # the child keeps its own copy of the descriptor
                    running[source] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), cmd,
                                       time.time())
            if failed and not running:
                break
            time.sleep(1)
            for source, (proc, cmd, t0) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[source]
                if code != 0:
                    failed.append(f"train {source} failed (exit {code})")
                    print(f"[study] train {source}: failed (exit {code}); " +
                          (f"waiting for {', '.join(running)} to finish" if running else "stopping"), flush=True)
                    continue
                print(f"[study] train {source}: finished in {time.time() - t0:.0f} s", flush=True)
                state["stages"][f"train {source}"] = {
                    "command": shlex.join(cmd), "seconds": round(time.time() - t0, 1), "commit": git_commit(),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "jobs": jobs}
                write_json_atomic(state_path, state)
    except BaseException:
        stop_processes(running)
        raise
    return failed


def stop_processes(running: dict) -> None:
    """Stop each running train.py (SIGTERM: it works where a background start made the process
    ignore Ctrl-C's SIGINT; the run keeps its finished epochs either way), wait for it to exit
    (30 s), kill it if it does not, and say so."""
    for source, (proc, _, _) in running.items():
        if proc.poll() is None:
            proc.terminate()
    for source, (proc, _, _) in running.items():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"[study] train {source}: stopped (process {proc.pid}); it continues from its last finished epoch "
              f"when the study runs again", flush=True)


def run_study(name: str, paper_data: Path, work: Path, out: Path, extra: list[str], jobs: int = 1,
              model: str | None = None) -> None:
    study = {**STUDIES[name], **({"model": model} if model else {})}
    missing = [f for f in [QUESTIONS_FILE, *PAPER_FILES.values()] if not (paper_data / f).is_file()]
    if missing:
        raise ValueError(f"--paper-data {paper_data}: no {', '.join(missing)}; clone "
                         f"https://github.com/XuanRen4470/I-Learn-Better-If-You-Speak-My-Language and give its "
                         f"dataset/GSM8K folder")
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    state_path, state = load_state(work)
    if state.get("model", study["model"]) != study["model"]:
        raise ValueError(f"{work} holds this study with the model {state['model']}, not {study['model']}: give "
                         f"that model, or another --work (and --out) for this one")
    state.update(study=name, model=study["model"], paper_data=str(paper_data), machine=machine())
    write_json_atomic(state_path, state)  # (the model, from the start: a later run may not change it)
    run_dirs = study_run_dirs(name, work)
    todo = []
    for source, run_dir in run_dirs.items():
        if (run_dir / "results.json").exists():
            print(f"[study] train {source}: done ({run_dir})", flush=True)
        else:
            todo.append(source)
    failed = run_stages(todo, study, paper_data, work, extra, jobs, state, state_path)
    if failed:
        raise RuntimeError(f"{'; '.join(failed)}: see the log(s) in {work / 'logs'}, fix it, and run the same "
                           f"command again to continue (finished stages are kept)")
    export_study(name, run_dirs, out, state, state_path)


def export_study(name: str, run_dirs: dict[str, Path], out: Path, state: dict, state_path: Path) -> None:
    """Stages 2 and 3: the report and the export of every source whose run has finished. With
    some still to run (`python study.py export` while the study goes on) the export says which
    are missing, in results.json and on screen; the full run exports all of them again."""
    done = {s: d for s, d in run_dirs.items() if (d / "results.json").exists()}
    missing = [s for s in run_dirs if s not in done]
    if not done:
        raise ValueError("no source of this study has finished yet: nothing to export")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    write_report([str(d) for d in done.values()], str(out))
    n_answers = export_answers(done, out)
    for source, run_dir in done.items():
        shutil.copytree(run_dir / "adapter", out / "adapters" / run_name(source), dirs_exist_ok=True)
    stage = "report and export" + (" (partial)" if missing else "")
    state["stages"][stage] = {"seconds": round(time.time() - t0, 1), "commit": git_commit(),
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not missing:
        state["stages"].pop("report and export (partial)", None)
    write_json_atomic(state_path, state)
    per_run = {s: json.loads((d / "results.json").read_text()) for s, d in done.items()}
    write_json_atomic(out / "results.json", {
        **state, "answers_rows": n_answers, "missing": missing,
        "n": {s: {"train": r["train_examples"], "validation": (r.get("validation_loss") or {}).get("n"),
                  "test": {t: v["n"] for t, v in r["test"].items()}} for s, r in per_run.items()}})
    print(f"[study] {name}: report in {out / 'report.md'}" +
          (f" ({len(done)} of {len(run_dirs)} sources; still to run: {', '.join(missing)})" if missing else ""),
          flush=True)


def status(name: str, work: Path) -> None:
    """Where each source's run stands, and the untuned model's scores: what a continued study
    skips and what it still has to do."""
    if not work.is_dir():
        raise ValueError(f"no work folder {work}: the study has not run here (or give --work)")
    run_dirs = study_run_dirs(name, work)
    width = max(len(s) for s in [*run_dirs, "untuned model"])
    for base in sorted((work / "runs").glob("base-*/results.json")):
        print(f"{'untuned model':{width}s}  {len(json.loads(base.read_text())['test'])} task(s) scored "
              f"({base.parent.name})")
    for source, run_dir in run_dirs.items():
        print(f"{source:{width}s}  {run_state(run_dir)}")


def run_state(run_dir: Path) -> str:
    """One line: done (with the in-domain accuracy), in its tests (which tasks are answered), in
    training (epochs finished of how many), started, or not started."""
    if (run_dir / "results.json").exists():
        results = json.loads((run_dir / "results.json").read_text())
        return f"done: {results['task']} {results['test'][results['task']]['accuracy']:.1%}"
    if not (run_dir / "config.json").exists():
        return "not started"
    config = json.loads((run_dir / "config.json").read_text())
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    epochs = sum('"val_accuracy"' in row for row in metrics)
    if epochs < config["epochs"] or not (run_dir / "checkpoint").exists():
        return f"training: {epochs} of {config['epochs']} epochs finished"
    task_names = eval_task_list(argparse.Namespace(**config))
    adapter_time = (run_dir / "adapter" / ADAPTER_WEIGHTS).stat().st_mtime
    # the tasks that `train.py --resume` would read back instead of answering again
    answered = [t for t in task_names
                if earlier_answers(run_dir / f"eval-{t}.jsonl", t, config["n_test"], adapter_time) is not None]
    return f"trained; testing: {len(answered)} of {len(task_names)} tasks answered ({', '.join(answered) or 'none'})"


def stop_like_ctrl_c(signum, frame) -> None:
    """SIGTERM (plain `kill`, a session's end) raises what Ctrl-C raises: without it Python exits at
    once, leaving the train.py processes running on their own, holding their run folders' locks."""
    raise KeyboardInterrupt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Run a whole study, resumably (run it again to continue).",
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("cmd", choices=["run", "status", "export"],
                    help="run (or continue) the study; show where it stands; or export the report of the sources "
                         "finished so far (while the study goes on)")
    ap.add_argument("study", choices=sorted(STUDIES), help="which study")
    ap.add_argument("--paper-data", default=None,
                    help="the dataset/GSM8K folder of a clone of the paper's repository (default: none; run needs "
                         "it, status does not)")
    ap.add_argument("--model", default=None,
                    help="train and test this model instead of the study's own (a short name or an HF-format "
                         "folder, e.g. Mistral-7B-Instruct-v0.2 for the paper study on a GPU); give it its own "
                         "--work and --out (default: the study's model)")
    ap.add_argument("--work", default=None, help="where runs and logs go (default: studies/<study>)")
    ap.add_argument("--out", default=None, help="where the results are exported (default: docs/results/<study>)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="train this many sources at once, one process each (give each its own CPU threads, e.g. "
                         "OMP_NUM_THREADS=1 with 2 jobs on 2 cores). Memory adds up: a training process of the "
                         "135M model peaks at ~8 GB of host memory, of the 0.5B model ~12 GB; --grad-checkpoint "
                         "(passed on to train.py; same gradients, ~1.25x the time) brings the 0.5B model's to 5-7 "
                         "GB")
    args, extra = ap.parse_known_args(argv)  # anything else goes to every train.py run
    work = Path(args.work or ROOT / "studies" / args.study)
    out = Path(args.out or ROOT / "docs" / "results" / args.study)
    try:
        if args.cmd == "status":
            return status(args.study, work.resolve())
        if args.cmd == "export":
            state_path, state = load_state(work.resolve())
            return export_study(args.study, study_run_dirs(args.study, work.resolve()), out.resolve(), state,
                                state_path)
        if not args.paper_data:
            raise ValueError("run needs --paper-data (the dataset/GSM8K folder of the paper's repository)")
        if args.jobs < 1:
            raise ValueError(f"--jobs must be 1 or more, not {args.jobs}")
        signal.signal(signal.SIGTERM, stop_like_ctrl_c)
        run_study(args.study, Path(args.paper_data).resolve(), work.resolve(), out.resolve(), extra, args.jobs,
                  args.model)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: run the same command again to continue")


if __name__ == "__main__":
    main()
