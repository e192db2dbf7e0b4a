"""Small file helpers shared by every command: reading user-supplied JSON / JSONL files.

The bottom of the import graph: it imports nothing from this project, and every other module may
import it. Errors are ValueErrors (FileNotFoundError for a missing file) whose message names the
file and the line or item, so a command can print them as one line.
"""

from __future__ import annotations

import json
from pathlib import Path


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
