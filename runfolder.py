"""A training run's folder, and the bookkeeping that lets a run be killed, continued or replaced.

train.py holds the method; this module holds what it writes down beside it. One source's run is
the folder runs/<name>/:
    config.json       every argument, the git commit, the training set's manifest
    perplexity.json   the untuned model's per-example perplexity (the paper's familiarity); a
                      resumed run (or one killed before its first checkpoint, started again
                      with the same settings) reads it back instead of measuring it again, if
                      it is of the same answer texts (their hash is saved with it)
    metrics.jsonl     one row per optimiser step and per epoch (validation)
    checkpoint/       the last finished epoch: adapter + optimiser + loop state (for --resume)
    adapter/          the best epoch's adapter, in PEFT's format
    eval-<task>.jsonl every test answer (--resume after a kill in the tests reads back the finished tasks)
    results.json      the test scores; written last, so its presence means "finished"

The rules, each in one place here:
- One train.py per run folder: `claim` holds a lock file beside the folder (not in it:
  --overwrite replaces the folder while the lock is held) and checks, before any work, whether the
  run starts, continues (--resume, only with the settings it was started with) or replaces one.
- --overwrite of a finished run keeps it aside (<name>.replaced) until the new run finishes, so a
  failed replacement loses nothing.
- The checkpoint is swapped in whole (fileio.replacing_folder); on --resume, metrics.jsonl is cut
  back to the checkpoint's epoch, so no step is counted twice.
- Under torchrun, rank 0 alone writes; the other ranks wait at barriers. `dist_setup` gives the
  process group a timeout long enough for rank 0's evaluations and builds.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist

import sources
from fileio import append_records, exclusive_lock, replacing_folder, write_json_atomic, write_jsonl_atomic
from lora import ADAPTER_WEIGHTS, load_adapter, save_adapter

# What a resumed run must share with the run it continues (saved in its config.json), besides its
# source and the hash of its training set (which covers the generation settings); anything else
# (device, batch size of evaluation, timeouts, where runs go) may differ.
SAME_ON_RESUME = ("model", "task", "seed", "n_train", "n_val", "n_test", "max_new_tokens", "lora_r",
                  "lora_alpha", "lora_dropout", "lora_targets", "epochs", "batch_size", "micro_batch", "lr",
                  "warmup_ratio", "weight_decay", "grad_clip", "max_seq_len", "dtype")


# ----------------------------------------------------------------------------------------------
# One run folder, seen from one process


class RunFolder:
    """The folder of `source`'s run. Every process makes one; only rank 0 writes into it."""

    def __init__(self, source: str, args, rank: int = 0, world: int = 1):
        self.source, self.args, self.rank, self.world = source, args, rank, world
        self.path = run_folder(source, args)
        self.checkpoint, self.adapter = self.path / "checkpoint", self.path / "adapter"
        self.metrics = self.path / "metrics.jsonl"
        # (main claimed every source's folder before any work; this cannot fail now)
        self.resuming = plan_run_folder(self.path, source, args)
        # what start() measured can be read back: when continuing a checkpoint, or when --resume
        # starts again a run killed before its first checkpoint, with the settings it was started with
        self.measured_before = self.resuming or (args.resume and self.rank == 0
                                                 and started_with_these_settings(self.path, source, args))

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{self.source}] {text}", flush=True)

    def barrier(self) -> None:
        """Every process waits here for the others (nothing in a single process)."""
        if self.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def rank_zero_first(self):
        """Rank 0 runs the block first, the other ranks after it (to read what it left, e.g. a
        training set it built into the sources cache)."""
        if self.rank != 0:
            dist.barrier()
        yield
        if self.rank == 0 and self.world > 1:
            dist.barrier()

    def start(self, config: dict, perplexity: dict | None) -> None:
        """A new run: an unfinished run in the folder is removed (plan_run_folder allowed it), a
        finished one (--overwrite) kept aside until this run finishes; then config.json and
        perplexity.json. The other ranks wait until the folder is ready."""
        if self.rank == 0:
            replaced = replaced_folder(self.path)
            if (self.path / "results.json").exists():  # --overwrite of a finished run
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(self.path, replaced)
                self.say(f"--overwrite: the finished run is kept in {replaced} until this one finishes")
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            write_json_atomic(self.path / "config.json", config)
            if perplexity:
                write_json_atomic(self.path / "perplexity.json", perplexity)
        self.barrier()

    def resume(self, model, optimizer, scaler, state: dict) -> dict:
        """Load the last checkpoint into the model's LoRA layers (injected already), the optimiser,
        the gradient scaler and torch's RNG; return the loop state it saved (the keys of `state`).
        metrics.jsonl is cut back to that epoch."""
        load_adapter(model, self.checkpoint / "adapter")  # checked against the LoRA layers, then loaded
        try:
            saved = torch.load(self.checkpoint / "trainer.pt", weights_only=False)
        except (RuntimeError, EOFError, OSError) as e:
            raise ValueError(f"cannot read {self.checkpoint / 'trainer.pt'} ({e}); the checkpoint is damaged: "
                             f"pass --overwrite to start the run again") from None
        optimizer.load_state_dict(saved["optimizer"])
        if scaler and saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng_torch"])
        state = {k: saved.get(k) for k in state}  # (a checkpoint of an older version has no val loss)
        if self.rank == 0:
            keep_metrics_up_to(self.metrics, state["epoch"])
        self.say(f"resuming after epoch {state['epoch']} (step {state['step']})")
        self.barrier()
        return state

    def log(self, row: dict) -> None:
        """One row of metrics.jsonl, on disk before the next step (rank 0)."""
        if self.rank == 0:
            append_records(self.metrics, [row])

    def save_epoch(self, model, optimizer, scaler, state: dict, lora_cfg, best: bool) -> None:
        """After an epoch (rank 0): its adapter if it is the best so far, then the checkpoint."""
        if best:
            save_adapter(model, self.adapter, lora_cfg, self.args.model)
        save_checkpoint(self.checkpoint, model, optimizer, scaler, state, lora_cfg, self.args.model)

    def saved_perplexity(self, answers_sha256: str) -> tuple[dict | None, dict | None]:
        """What start() saved in perplexity.json: (this source's untuned perplexity, the human
        answers' or None). (None, None) on the other ranks, or when it is missing, unreadable, or
        of other answer texts than `answers_sha256` names (a cache rebuilt since: its key names the
        inputs, not the text); the caller then measures it again."""
        path = self.path / "perplexity.json"
        if self.rank != 0 or not path.is_file():
            return None, None
        try:
            saved = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, None
        if saved.get("answers_sha256") != answers_sha256:
            self.say("perplexity.json is of other answer texts than this training set's: measuring again")
            return None, None
        self.say("the untuned perplexity measured when the run started is read back (perplexity.json)")
        human = saved.pop("human", None)
        saved.pop("source", None)
        return saved, human

    def adapter_time(self) -> float:
        """When the kept adapter was written: test answers older than it belong to another adapter."""
        return (self.adapter / ADAPTER_WEIGHTS).stat().st_mtime

    def finish(self, results: dict) -> None:
        """results.json marks the run finished; a run it replaced (--overwrite) goes now."""
        write_json_atomic(self.path / "results.json", results)
        shutil.rmtree(replaced_folder(self.path), ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Where runs go, and whether one may start


def run_folder(source: str, args) -> Path:
    slug = source.replace(":", "_").replace("/", "_")
    name = args.run_name or f"{args.task}-{slug}-{args.model.split('/')[-1]}-s{args.seed}"
    return Path(args.runs_dir) / name


def lock_path(run_dir: Path) -> Path:
    """Beside the run folder, not in it: --overwrite replaces the folder while the lock is held."""
    return run_dir.with_name(run_dir.name + ".lock")


def replaced_folder(run_dir: Path) -> Path:
    """Where --overwrite keeps a finished run until the run replacing it finishes."""
    return run_dir.with_name(run_dir.name + ".replaced")


@contextlib.contextmanager
def claim(source: str, args, rank: int):
    """Hold `source`'s run folder for the block: its lock (rank 0; one train.py per run folder,
    two would mix metrics and checkpoints) and the check that the run may start (plan_run_folder),
    so a clash is an error now, not after hours of work."""
    path = run_folder(source, args)
    with exclusive_lock(lock_path(path), f"run folder {path}") if rank == 0 else contextlib.nullcontext():
        plan_run_folder(path, source, args)
        yield


def training_set_hash(source: str, args) -> str:
    """The hash that names `source`'s cached training set for these settings (sources.inputs_hash),
    computed without building it."""
    inputs = sources.set_inputs(source, args.model, args.task, args.n_train, args.seed, args.gen_dtype,
                                **sources.question_overrides(args), **sources.generation_overrides(args))
    return sources.inputs_hash(inputs)


def plan_run_folder(run_dir: Path, source: str, args) -> bool:
    """True if this run continues run_dir's last checkpoint (--resume). Raises ValueError when
    run_dir holds a run that neither --resume nor --overwrite was given for, or when --resume is
    given for another source, another training set or other settings than the saved run's.
    Changes nothing on disk."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a run folder; move it, or pick another --run-name / --runs-dir")
    checkpoint = run_dir / "checkpoint" / "trainer.pt"
    exists = run_dir.exists() and any(run_dir.iterdir())
    if args.resume and checkpoint.exists():
        changed = changed_settings(run_dir, source, args)
        if changed:
            raise ValueError(f"--resume continues {run_dir} with its own settings, but these differ: "
                             f"{'; '.join(changed)}. Use the run's settings, or --overwrite / --run-name for a new run")
        return True
    if exists and not args.resume and not args.overwrite:
        raise ValueError(f"run folder {run_dir} already exists: pass --resume to continue it, "
                         f"--overwrite to replace it, or --run-name to pick another")
    if exists and args.resume and (run_dir / "results.json").exists():
        raise ValueError(f"{run_dir} holds a finished run without a checkpoint to resume; pass --overwrite to "
                         f"replace it")
    return False  # a new run; --resume of a run killed before its first checkpoint starts it again


def changed_settings(run_dir: Path, source: str, args) -> list[str]:
    """What differs between the run saved in run_dir/config.json and this one (its source, the
    SAME_ON_RESUME settings, the test tasks, the training set's hash), one "--flag old -> new" per
    difference; [] when nothing does. Raises ValueError when config.json cannot be read."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        saved_set = saved["manifest"]["inputs_sha256"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the settings in {run_dir / 'config.json'} ({e!r}): pass --overwrite "
                         f"to start again") from None
    changed = [f"--source {saved.get('source')} -> {source}"] if saved.get("source") != source else []
    changed += [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}" for k in SAME_ON_RESUME
                if k in saved and saved[k] != getattr(args, k)]  # (a key an older version did not save: skipped)
    if "eval_tasks" in saved and set(saved["eval_tasks"]) != set(args.eval_tasks):
        changed.append(f"--eval-tasks {' '.join(saved['eval_tasks'])} -> {' '.join(args.eval_tasks)}")
    wanted_set = training_set_hash(source, args) if not changed else saved_set
    if wanted_set != saved_set:
        changed.append(f"the training set (cache {source.split(':')[0]}-{saved_set} -> {wanted_set}: other "
                       f"generation settings, or built by a version with another answer rule)")
    return changed


def started_with_these_settings(run_dir: Path, source: str, args) -> bool:
    """Whether run_dir holds the start of this very run: config.json readable and no setting
    changed. --resume of a run killed before its first checkpoint starts the training again, but
    then the untuned perplexity its start saved is still this run's (8 minutes for 500 answers of
    a 0.5B model on a CPU), so it is read back rather than measured again."""
    try:
        return not changed_settings(run_dir, source, args)
    except ValueError:  # missing or unreadable: measure again
        return False


# ----------------------------------------------------------------------------------------------
# Checkpoints and metrics


def save_checkpoint(folder: Path, model, optimizer, scaler, state: dict, lora_cfg, model_name):
    """The last finished epoch: adapter + optimiser + loop state, swapped in atomically."""
    with replacing_folder(folder) as tmp:
        save_adapter(model, tmp / "adapter", lora_cfg, model_name)
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "rng_torch": torch.get_rng_state(), **state}, tmp / "trainer.pt")


def keep_metrics_up_to(path: Path, epoch: int) -> None:
    """Cut metrics.jsonl back to the checkpoint's last epoch: the rows written after it (a run
    killed mid-epoch, or between its validation row and its checkpoint) are written again by the
    resumed run, and a report would count those steps twice. A torn last line goes too."""
    if not path.exists():
        return
    complete = path.read_text().split("\n")[:-1]  # (the text after the last newline is torn)
    rows = [json.loads(line) for line in complete if line.strip()]
    write_jsonl_atomic(path, [r for r in rows if r["epoch"] <= epoch])


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ----------------------------------------------------------------------------------------------
# torchrun's processes (all no-ops in a single process)


def dist_setup(timeout: datetime.timedelta):
    """(rank, world_size) from torchrun's environment; initialises the process group if > 1.

    `timeout` is how long a process waits at a barrier for the others. Rank 0 alone evaluates the
    base model, builds each training set (generation) and tests each adapter while the other
    ranks wait; with a 7B model that takes hours, and torch's defaults (10 minutes under NCCL, 30
    under gloo) would make the waiting ranks abort the run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timeout)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank() if world > 1 else 0), world


def leave_together(world: int, timeout: datetime.timedelta) -> None:
    """Every process waits for the others before the group is torn down. Rank 0 tests each source
    alone after the last epoch; a gloo rank that tore the process group down meanwhile aborted
    once in CI ("terminate called without an active exception"). (NCCL: never seen there, no wait.)"""
    if world > 1 and dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=timeout)


def close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
