"""Faults a careless or unlucky user meets (issue 20): torn and interleaved writes, two processes
on one folder, NaN, bad input that used to be accepted. Each is one clear line and loses nothing.
The random kills of whole processes are in test_kill_and_resume.py."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fileio
import sources
import train
from test_train import base_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "sources")


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def exit_line(main, argv) -> str:
    """The one-line error of a command line that must refuse argv."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None) and "\n" not in str(e.value)
    return str(e.value)


def human_set(n=4):
    """The human set built fresh in the test's cache: (records, its cache folder)."""
    records, manifest = sources.build("human", n_train=n, progress=False)
    return records, Path(manifest["cache_folder"])


# ----------------------------------------------------------------------------------------------
# Building sources: torn and interleaved partial files, one builder per set


def restart_from_partial(folder: Path, partial: bytes, monkeypatch) -> list[dict]:
    """Rebuild the set of `folder` as if a build had been killed with `partial` on disk."""
    for name in ("data.jsonl", "manifest.json"):
        (folder / name).unlink()
    (folder / "data.partial.jsonl").write_bytes(partial)
    return sources.build("human", n_train=4, progress=False)[0]


def test_a_torn_partial_line_keeps_every_complete_record(monkeypatch):
    """Killed mid-line in the second chunk: its first record is complete, the second torn. The
    rerun builds only the missing questions and ends with the uninterrupted set (it used to write
    the chunk again, find a question twice and stop with a RuntimeError)."""
    monkeypatch.setattr(sources, "CHUNK", 2)
    records, folder = human_set()
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records]
    built = []
    real = sources.build_chunk
    monkeypatch.setattr(sources, "build_chunk", lambda *a, **k: built.append(a[2][0].id) or real(*a, **k))
    again = restart_from_partial(folder, b"".join(lines[:3]) + lines[3][:25], monkeypatch)
    assert again == records and built == [records[2]["id"]]  # only the torn chunk ran again
    assert not (folder / "data.partial.jsonl").exists()


def test_a_partial_file_two_builders_wrote_is_repaired_in_one_line(monkeypatch, capsys):
    """What two unlocked builders left behind (a record twice, a line of two half-records) is
    said in one line and repaired; it used to fail every later run until deleted by hand."""
    monkeypatch.setattr(sources, "CHUNK", 2)
    records, folder = human_set()
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records]
    poisoned = lines[0] + lines[1] + lines[0] + lines[2][:30] + lines[3][10:] + lines[2]
    assert restart_from_partial(folder, poisoned, monkeypatch) == records
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dropped 2 damaged or repeated line(s)" in err[0]


def test_a_second_builder_waits_for_the_first_and_reuses_its_set(monkeypatch, capsys):
    records, folder = human_set()
    saved = {name: (folder / name).read_bytes() for name in ("data.jsonl", "manifest.json")}
    for name in saved:
        (folder / name).unlink()
    first = fileio.exclusive_lock(folder.with_name(folder.name + ".lock"), "the first builder")
    first.__enter__()  # (flock: a second descriptor, even in this process, has to wait)

    def first_finishes():
        for name, raw in saved.items():
            (folder / name).write_bytes(raw)
        first.__exit__(None, None, None)

    threading.Timer(0.5, first_finishes).start()
    monkeypatch.setattr(sources, "build_chunk", lambda *a, **k: pytest.fail("built the set a second time"))
    assert sources.build("human", n_train=4, progress=False)[0] == records
    assert "waiting for process" in capsys.readouterr().err


def test_the_lock_names_its_holder_and_a_dead_holder_does_not_count(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); import fileio\n"
                               "with fileio.exclusive_lock(sys.argv[2], 'x'):\n print('held', flush=True); time.sleep(60)",
                               str(ROOT), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"x is in use by process {holder.pid} "):
            with fileio.exclusive_lock(lock, "x"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock.read_text().strip() == str(holder.pid)  # killed: its lock file stays behind
    with fileio.exclusive_lock(lock, "x"):  # ... and is taken over, not an error
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


# ----------------------------------------------------------------------------------------------
# file: sources, the sources cache, counts and seeds: refused before any model work


def file_source(tmp_path, rows) -> str:
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"file:{path}"


def test_a_question_twice_with_two_answers_is_refused(tmp_path):
    records, _ = human_set(2)
    q0, q1 = records[0]["question"], records[1]["question"]
    rows = [{"question": q0, "answer": "A. Final Answer: 1"}, {"question": q1, "answer": "B. Final Answer: 2"},
            {"question": "  " + q0.upper(), "answer": "C. Final Answer: 3"}]  # the same question, matched as such
    with pytest.raises(ValueError, match="entries 1 and 3 ask the same question with different answers"):
        sources.build(file_source(tmp_path, rows), n_train=2, progress=False)
    rows[2]["answer"] = rows[0]["answer"]  # the same answer twice is no ambiguity
    kept, _ = sources.build(file_source(tmp_path, rows), n_train=2, progress=False)
    assert [r["response"] for r in kept] == ["A. Final Answer: 1", "B. Final Answer: 2"]


def test_a_file_with_nothing_to_train_on_stops_before_any_model_work(tiny_dir, tmp_path, monkeypatch):
    records, _ = human_set(2)
    monkeypatch.setattr(train, "evaluate_base", lambda *a: pytest.fail("evaluated before checking the file"))
    nothing = file_source(tmp_path, [{"question": "Not a GSM8K question?", "answer": "Final Answer: 1"}])
    for main, argv in ((sources.main, ["--source", nothing, "--n-train", "2"]),
                       (train.main, base_args(tiny_dir, tmp_path, source=nothing, n_train=2))):
        assert "none of its 1 questions is among the 2 gsm8k training questions" in exit_line(main, argv)
    empty = file_source(tmp_path, [{"question": records[0]["question"], "answer": "  "}])
    assert "line 1 has an empty answer" in exit_line(sources.main, ["--source", empty, "--n-train", "2"])
    assert not (tmp_path / "runs").exists()


def test_a_read_only_sources_cache_is_one_line_before_the_base_evaluation(tiny_dir, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores the mode; procfs's sys folder is read-only for root too
        ro = Path("/proc/sys/ilb-sources")
        if os.access(ro.parent, os.W_OK):
            pytest.skip("no read-only folder to try")
    monkeypatch.setattr(sources, "CACHE_DIR", ro / "cache")
    monkeypatch.setattr(train, "evaluate_base", lambda *a: pytest.fail("evaluated before checking the cache"))
    assert "ILB_SOURCES_DIR" in exit_line(sources.main, ["--source", "human", "--n-train", "2"])
    assert "cannot write into" in exit_line(train.main, base_args(tiny_dir, tmp_path))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("module,argv,needle", [
    ("sources", ["--source", "human", "--n-train", "0"], "--n-train must be at least 1; got 0"),
    ("sources", ["--source", "human", "--seed", "-1"], "--seed must be between 0 and 2**30 - 1; got -1"),
    ("tasks", ["--n", "-1"], "--n must be at least 1; got -1"),
    ("tasks", ["--seed", "-1"], "--seed must be between 0"),
    ("sources", ["show", "--n", "0"], "--n must be at least 1"),
    ("sources", ["show", "--n-train", "0", "--source", "self"], "--n-train must be at least 1"),
    ("sources", ["show", "--seed", "-2"], "--seed must be between 0"),
    ("perplexity", ["--seed", "-1"], "--seed must be between 0"),
    ("generation", ["--prompt", "hi", "--seed", str(2 ** 70)], "--seed must be between 0 and 2**63 - 1"),
])
def test_counts_and_seeds_out_of_bounds(module, argv, needle, tmp_path):
    import importlib
    assert needle in exit_line(importlib.import_module(module).main, argv)
    assert not (tmp_path / "sources").exists()  # no set was cached


# ----------------------------------------------------------------------------------------------
# train.py: flags that contradict or escape, a second run on one folder, NaN, resumed metrics


@pytest.mark.parametrize("flags,needle", [
    (["--resume", "--overwrite"], "--resume continues a run and --overwrite replaces it; pass one of them"),
    (["--run-name", "../../x"], "--run-name ../../x is not a folder inside --runs-dir"),
    (["--run-name", "/tmp/x"], "--run-name /tmp/x is not a folder inside --runs-dir"),
    (["--run-name", "."], "--run-name . is not a folder inside --runs-dir"),
])
def test_contradicting_or_escaping_run_flags(tiny_dir, tmp_path, flags, needle):
    assert needle in exit_line(train.main, base_args(tiny_dir, tmp_path)[:-2] + flags)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_second_train_on_one_run_folder_names_the_first(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "evaluate_base", lambda *a: pytest.fail("a second run started work"))
    with fileio.exclusive_lock(tmp_path / "runs" / "r.lock", "the first run"):
        line = exit_line(train.main, base_args(tiny_dir, tmp_path))
    assert f"run folder {tmp_path / 'runs' / 'r'} is in use by process {os.getpid()}" in line
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == []  # the lock went with its holder


def one_step_run(tiny_dir, tmp_path, **over):
    """A run of exactly one optimiser step: no later step's loss would show a NaN it left."""
    return base_args(tiny_dir, tmp_path, n_train=4, batch_size=4, epochs=1, **over)


def assert_nothing_non_finite_saved(run: Path):
    for f in run.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(f).values()), f
    assert not (run / "adapter").exists() and not (run / "results.json").exists()


def test_weights_that_overflow_stop_the_run_and_are_never_saved(tiny_dir, tmp_path):
    # AdamW's first step multiplies the weights by 1 - lr * weight_decay = -1e39: -inf in fp32
    line = exit_line(train.main, one_step_run(tiny_dir, tmp_path, lr=1e37, weight_decay=100))
    assert "LoRA weight model.layers.0.self_attn.q_proj.lora_A became non-finite at step 1" in line
    assert "Lower --lr (now 1e+37) or --grad-clip (now 1)" in line and "--dtype fp32" not in line
    assert_nothing_non_finite_saved(tmp_path / "runs" / "r")


def test_a_nan_gradient_with_a_finite_loss_stops_the_run(tiny_dir, tmp_path, monkeypatch):
    real = train.masked_nll_sum

    def nan_gradient(model, batch, autocast_dtype):  # 0 * sqrt(0): a finite 0 whose gradient is NaN
        lora = next(p for p in model.parameters() if p.requires_grad)
        return real(model, batch, autocast_dtype) + 0 * torch.sqrt(lora.sum() * 0)

    monkeypatch.setattr(train, "masked_nll_sum", nan_gradient)
    line = exit_line(train.main, one_step_run(tiny_dir, tmp_path))
    assert "the gradient norm became nan at step 1 (epoch 1); nothing of this epoch is saved" in line
    assert_nothing_non_finite_saved(tmp_path / "runs" / "r")


def metric_keys(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["step"], "train_loss" in r) for r in rows]


def test_resume_writes_no_metrics_row_twice(tiny_dir, tmp_path, monkeypatch):
    """Killed at the second step of epoch 2: the rows of its first step were written after the
    checkpoint, and the resumed run writes them again."""
    train.main(base_args(tiny_dir, tmp_path / "straight"))
    real_step, calls = train.train_step, []

    def killed_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.main(base_args(tiny_dir, tmp_path))
    assert metric_keys(tmp_path / "runs" / "r")[-1] == (2, 4, False)
    monkeypatch.setattr(train, "train_step", real_step)
    train.main(base_args(tiny_dir, tmp_path) + ["--resume"])
    keys = metric_keys(tmp_path / "runs" / "r")
    # 9 rows: the untuned model's validation loss (epoch 0), 2 x 3 steps, 2 validation rows
    assert keys == metric_keys(tmp_path / "straight" / "runs" / "r") and len(keys) == len(set(keys)) == 9


# ----------------------------------------------------------------------------------------------
# A model whose weights hold NaN or Inf


def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tiny_dir, tmp_path):
    import shutil

    import model
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_dir, bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("inf")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(model.ModelLoadError, match="tensor 'model.layers.1.mlp.down_proj.weight' holds NaN or Inf"):
        model.Transformer.from_pretrained(bad)
    import generation
    assert "holds NaN or Inf" in exit_line(generation.main, ["--model", str(bad), "--prompt", "hi"])
