"""Fault injection (issue 20): a training run and a source build, each killed with SIGKILL at
random moments several times and then resumed, end exactly as an uninterrupted one: the same
adapter bit for bit (CPU), the same metrics rows and the same training records, none lost and
none twice. Real processes, so a kill can land anywhere, mid-line included."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import base_args

ROOT = Path(__file__).resolve().parent.parent
KILLS = 3


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def run_to_end(cmd, env) -> None:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]


def lines_in(pattern: str, root: Path) -> int:
    """Complete lines in the files under root that match pattern: how far a run has written. The
    run swaps folders while this walks (a temporary checkpoint folder renamed into place): a folder
    or file that vanishes mid-walk makes it walk again."""
    while True:
        try:
            return sum(f.read_bytes().count(b"\n") for f in root.rglob(pattern))
        except FileNotFoundError:  # replaced meanwhile
            continue


def kill_and_resume(first, again, env, progress, total, seed):
    """Start `first` and SIGKILL it once progress() reaches a random point in (0, total), plus a
    random moment of the work after it; then `again` (the resume), KILLS times in all, each
    later than the one before; then `again` to its end."""
    rng = random.Random(seed)
    cmd = first
    for target in sorted(rng.sample(range(1, total), KILLS)):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        while progress() < target and p.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        assert p.poll() is None, "the run ended before its kill"
        p.kill()
        p.wait()
        cmd = again
    run_to_end(again, env)


def child_env(folder: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ILB_SOURCES_DIR": str(folder / "sources")}


def test_a_training_run_killed_at_random_resumes_to_the_same_adapter(tiny_dir, tmp_path):
    def command(where, *extra):
        return [sys.executable, str(ROOT / "train.py")] + base_args(tiny_dir, where, epochs=3) + list(extra)

    run_to_end(command(tmp_path / "straight"), child_env(tmp_path / "straight"))
    kill_and_resume(command(tmp_path / "killed"), command(tmp_path / "killed", "--resume"),
                    child_env(tmp_path / "killed"), lambda: lines_in("metrics.jsonl", tmp_path / "killed" / "runs"),
                    total=1 + 3 * 3 + 3, seed=20)
    straight, killed = tmp_path / "straight" / "runs" / "r", tmp_path / "killed" / "runs" / "r"
    for f in ("adapter/adapter_model.safetensors", "checkpoint/adapter/adapter_model.safetensors"):
        assert (straight / f).read_bytes() == (killed / f).read_bytes(), f

    def rows(run):  # (the time an epoch took differs)
        return [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows(killed) == rows(straight) and len(rows(straight)) == 1 + 3 * 3 + 3  # untuned, steps, epochs
    test = [json.loads((run / "results.json").read_text())["test"] for run in (straight, killed)]
    assert test[0] == test[1]
    assert sorted(p.name for p in killed.parent.iterdir() if not p.name.startswith("base-")) == ["r"]  # no lock, no temp


def test_a_source_build_killed_at_random_resumes_to_the_same_records(tiny_dir, tmp_path):
    command = [sys.executable, str(ROOT / "sources.py"), "--source", "self", "--model", str(tiny_dir),
               "--n-train", "48", "--k", "1", "--max-new-tokens", "32", "--dtype", "fp32"]
    run_to_end(command, child_env(tmp_path / "straight"))
    kill_and_resume(command, command, child_env(tmp_path / "killed"),
                    lambda: lines_in("data.partial.jsonl", tmp_path / "killed"), total=40, seed=20)
    [straight] = (tmp_path / "straight" / "sources").rglob("data.jsonl")
    [killed] = (tmp_path / "killed" / "sources").rglob("data.jsonl")
    assert killed.read_bytes() == straight.read_bytes()
    ids = [json.loads(line)["id"] for line in killed.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 48
    assert sorted(p.name for p in killed.parent.iterdir()) == ["data.jsonl", "manifest.json"]
    assert not list(killed.parent.parent.glob("*.lock"))
