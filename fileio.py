"""Small helpers shared by every command, one of each: reading user-supplied JSON / JSONL files,
the atomic write, the checks of a place results will go, the lock file, the progress bar and the
lookup of a file shipped inside an installed package.

The bottom of the import graph: it imports nothing from this project, and every other module may
import it. Errors are ValueErrors (FileNotFoundError for a missing file) whose message names the
file, the flag and the line or item, so a command can print them as one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Reading what the user gives


def check_input_file(path, label: str) -> None:
    """A folder or a missing file given where a JSON/JSONL file goes: one line naming the flag or
    source (`label`, e.g. "--train-questions", "file source")."""
    if Path(path).is_dir():
        raise ValueError(f"{label} {path} is a folder; give the JSON or JSONL file in it")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{label} {path} does not exist")


def read_json_rows(path, what: str, label: str) -> tuple[list[tuple[int, dict]], str]:
    """The objects of a JSON list or a JSONL file, each with its number, and what that number
    counts: "item" (of a JSON list) or "line" (of a JSONL file), for messages about a row.

    `what` says what the file should hold, for the error messages ("{question, answer}"); `label`
    names where the file was given (check_input_file).
    """
    check_input_file(path, label)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a JSON list or "
                         f"JSONL of {what}") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; expected a JSON list or JSONL of {what}")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        numbered, where = [(i + 1, r) for i, r in enumerate(rows)], "item"  # item numbers for a list
    else:
        numbered, where = [], "line"
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON line ({e.msg})") from None
    for n, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {where} {n} is not a JSON object")
    return numbered, where


def check_at_least_one(**flags) -> None:
    """ValueError naming the first flag (given as its dest name) whose value is below 1; None
    stands for the flag's default and passes."""
    for dest, value in flags.items():
        if value is not None and value < 1:
            raise ValueError(f"--{dest.replace('_', '-')} must be at least 1; got {value}")


# ----------------------------------------------------------------------------------------------
# Writing: where results go, and the one atomic write


def check_output_folder(path, flag: str) -> None:
    """ValueError, before the work whose results go there, if `path` cannot become a folder we
    write into: a file in the way, or the nearest existing folder not writable."""
    wanted = Path(path)
    for p in [wanted, *wanted.parents]:
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{flag} {path}: {p} is a file, not a folder; pick another {flag}")
            if not os.access(p, os.W_OK):
                raise ValueError(f"{flag} {path}: cannot write into {p}; pick another {flag}")
            return


def check_output_file(path, flag: str) -> None:
    """check_output_folder for the file's folder, and the file itself must not be a folder."""
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {Path(path) / 'results.json'}")
    check_output_folder(Path(path).parent, flag)


def write_atomic(path, write, binary: bool = False) -> None:
    """Create or replace the file `path` whole: `write(f)` fills a temporary file beside it, which
    is flushed to disk and then renamed over `path`. A reader sees the old file or the new one,
    never half of one; a crash leaves the old file. The temporary name is unique, so two processes
    writing the same file cannot mix their bytes (the last rename wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # no stray temp file beside the target
        raise


def write_json_atomic(path, obj) -> None:
    write_atomic(path, lambda f: json.dump(obj, f, indent=2, ensure_ascii=False))


def write_jsonl_atomic(path, rows: list[dict]) -> None:
    write_atomic(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_text_atomic(path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def append_records(path, records: list[dict]) -> None:
    """Append JSONL lines and flush them to disk: a kill loses at most the line being written (a
    torn last line, which the readers of these files cut off)."""
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def replacing_folder(folder):
    """Fill a new temporary sibling of `folder` in the block; when the block ends, it takes
    `folder`'s place whole (an old folder is moved aside first: os.replace cannot replace a
    non-empty folder), so a crash never leaves a folder holding new files beside old ones. An
    exception in the block removes the temporary folder and leaves `folder` as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; these are ordinary folders
        yield tmp
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old.{os.getpid()}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path, what: str, wait: bool = False):
    """Hold an exclusive lock file at `path` for the block; the file names the holder's PID.

    flock, not a file that merely exists: the kernel drops the lock when its holder dies, however
    it dies, so a lock left by a killed process is simply taken over. Taken (wait=False): a
    ValueError naming the holder; wait=True: one line on stderr, then wait for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            if not wait:
                os.close(fd)
                raise ValueError(f"{what} is in use by process {holder} (lock {path}); wait for it to "
                                 f"finish, or stop it") from None
            print(f"waiting for process {holder}, which holds {path} ({what})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder before us unlinks the file as it leaves: lock the file that is there now
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # still held: nobody can have locked this file meanwhile
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# The progress bar


def progress_bar(iterable, desc: str, unit: str, enabled: bool = True, total: int | None = None):
    """`iterable`, with a progress bar on stderr (stdout stays for results) when `enabled`."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=not enabled, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Files shipped inside installed packages (model weights, data sets)


class MissingPackageError(FileNotFoundError):
    """A package that ships files we read, or one of its files, is missing; the message says
    what to install."""


def package_file(package: str, relpath: str, pip: str, what: str | None = None) -> Path:
    """The file `relpath` inside the installed package `package`, found WITHOUT importing the
    package: find_spec locates its folder without running its __init__ (which, in some of the
    packages we read, imports pandas, torch and worse). `pip` is the command that installs it and
    `what` what it ships, for the error message."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a parent package that is missing raises instead of giving None
        spec = None
    shipped = f" ({what})" if what else ""
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"package '{package}'{shipped} is not installed; install it with: {pip}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / relpath
        if path.is_file():
            return path
    raise MissingPackageError(f"'{relpath}' not found in package '{package}' "
                              f"({', '.join(spec.submodule_search_locations)}); reinstall it with: {pip}")
