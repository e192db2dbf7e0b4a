"""Answer extraction and grading: what a reply's final answer is, and whether it equals the gold.

The paper's protocol (section 3): "the `\\boxed{}` content, else the text after `Final Answer:`,
else the last number, compared numerically"; multiple choice by the chosen letter. Every function
here takes text, so it is tested without a model. Which rules apply is the task's answer kind
(tasks.TASKS names it for each task):
- "numeric": GSM8K-like, the answer is one number;
- "math": MATH, a LaTeX expression that is often but not always a number;
- "choice": multiple choice, a letter;
- "code": graded by running tests (eval.py), never by extracting an answer.
eval.py grades a model's test answers with it, sources.py decides which generated training
answers are correct, tasks.py takes MATH's gold answers out of its solutions' last box.

Deviations from the paper's released code, all deliberate:
- Extraction falls through: when the last `\\boxed{}` or the last `Final Answer:` holds no
  usable answer (a 135M model truncated mid-line, `Final Answer:` and then nothing) we try the
  one before it, then the next source. The paper's code would score such an output as wrong.
- Inside a `Final Answer:` line we take the first number after the last `=` (so
  `Final Answer: 16 - 3 - 4 = 9 eggs, 9 * 2 = $18` gives 18 and `Final Answer: 18 eggs` gives
  18), and only that line: small models keep writing after the answer.
- MATH answers that are not numbers are compared as strings after `normalize_math`, a light,
  hand-written version of the standard MATH `strip_string` (Hendrycks et al.); numbers (also
  `\\frac{1}{2}` against `0.5`) are compared as the paper does, rounded to 2 decimals.

Nothing here imports the rest of the project.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

KINDS = ("numeric", "math", "choice", "code")

# A number as people write it: optional minus (not the minus of `3-5`, which is a subtraction),
# thousands separators only in groups of three (so the list `1, 2, 3` stays three numbers), an
# optional decimal part, or a bare `.5`.
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_SIGNED = rf"(?:(?<![0-9A-Za-z)\]}}])-)?(?:{_NUM})"
# A fraction `a/b` is tried before a plain number at the same position.
_NUMBER_RE = re.compile(rf"{_SIGNED}\s*/\s*(?:{_NUM})(?!\.?\d)|{_SIGNED}")
_FINAL_RE = re.compile(r"final\s+answer\s*\**\s*[:：]", re.IGNORECASE)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_LATEX_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")


def boxed_contents(text: str) -> list[str]:
    r"""Contents of every `\boxed{...}` (and `\fbox{...}`) in order, nested braces respected.

    An unclosed box (output truncated inside it) is skipped. `\boxed 5` without braces counts.
    """
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth == 0:
                out.append(text[i + 1:j])
        else:
            bare = re.match(r"[^\s$]+", text[i:])  # `\boxed 5$`
            if bare:
                out.append(bare.group(0))
    return out


def last_boxed(text: str) -> str | None:
    r"""The content of the last closed `\boxed{}` (tasks.py's MATH gold answers: where a solution
    boxes more than once, the last box is the answer, as in Hendrycks et al.'s
    `last_boxed_only_string`); None if there is none."""
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else None


def final_answer_spans(text: str) -> list[str]:
    """The text after each `Final Answer:` (case-insensitive), up to the end of its line.

    If the rest of the line is empty (`Final Answer:\\n18`) the next non-empty line is taken.
    Markdown bold around the answer is dropped.
    """
    spans = []
    for m in _FINAL_RE.finditer(text):
        rest = text[m.end():]
        lines = rest.split("\n")
        span = next((ln for ln in lines[:3] if ln.strip(" *\t")), "")
        spans.append(span.strip().strip("*").strip())
    return spans


def _latex_fracs_to_slash(s: str) -> str:
    s = _LATEX_FRAC_RE.sub(r"\1/\2", s)
    return _LATEX_FRAC_SHORT_RE.sub(r"\1/\2", s)


def canonical_number(s: str) -> str | None:
    """`"1,000"` -> `"1000"`, `"18.00"` -> `"18"`, `"-.5"` -> `"-0.5"`, `"2/4"` -> `"1/2"`."""
    s = s.replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            p, q = s.split("/")
            if Fraction(q) == 0:
                return None
            f = Fraction(p) / Fraction(q)
            return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
        d = Decimal(s).normalize()
    except (ValueError, InvalidOperation, ZeroDivisionError):
        return None
    out = format(d, "f")  # "f" avoids normalize()'s "1E+1" for 10
    return "0" if out in ("-0", "0") else out


def _numbers(s: str) -> list[str]:
    """Every number in `s`, canonical, in order. `$`, `%`, units and words are ignored."""
    s = s.replace("\u2212", "-")  # unicode minus
    s = re.sub(r"<<[^>]*>>", " ", s)  # GSM8K calculator annotations `<<16-3-4=9>>`
    s = s.replace("\\$", "$").replace("$", "")  # dollars and inline-math delimiters
    s = s.replace("\\!", "").replace("\\,", "").replace("{,}", ",")  # `1{,}000` in LaTeX
    s = _latex_fracs_to_slash(s)
    out = []
    for m in _NUMBER_RE.finditer(s):
        c = canonical_number(m.group(0))
        if c is not None:
            out.append(c)
    return out


def _number_in_span(span: str) -> str | None:
    """The answer inside a short span: the first number after the last `=`."""
    after = span.rsplit("=", 1)[-1]
    nums = _numbers(after) or _numbers(span)
    return nums[0] if nums else None


def _strip_math_delimiters(span: str) -> str:
    """`The answer is $\\frac{9}{7}$.` -> `\\frac{9}{7}`: the last inline-math segment, if any."""
    span = span.replace("\\$", "\x00")  # a literal dollar sign is not a delimiter
    for pat in (r"\$\$(.+?)\$\$", r"\$(.+?)\$", r"\\\((.+?)\\\)", r"\\\[(.+?)\\\]"):
        segs = re.findall(pat, span)
        if segs:
            return segs[-1].replace("\x00", "\\$")
    return span.replace("\x00", "\\$")


def _is_prose(s: str) -> bool:
    """True if `s` has English words (3+ letters) outside LaTeX commands and `\\text{}`."""
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf)\{[^{}]*\}", " ", s)
    s = re.sub(r"\\[A-Za-z]+", " ", s)
    return re.search(r"[A-Za-z]{3,}", s) is not None


def normalize_math(s: str) -> str:
    r"""A light, hand-written version of the MATH `strip_string` normaliser.

    Removes what does not change the answer: spaces, `\left`/`\right`, `\!`/`\,`/`\;`,
    `^\circ`, `\$`, `\%`, trailing `\text{ units}`, a trailing period, an `x=` prefix; writes
    `\dfrac`/`\tfrac` as `\frac`, `\frac12` as `\frac{1}{2}`, `\sqrt2` as `\sqrt{2}`, `.5` as `0.5`.
    """
    s = s.strip().replace("\n", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\displaystyle", "")
    # Units: `5\text{ cm}`, `10\text{ inches}^2`, `3 \mbox{ dollars}`: drop a trailing text block
    # that follows something; a text block that is the whole answer (`\text{Evelyn}`) is kept.
    s = re.sub(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{\s[^{}]*\}(\^\d)?\s*$", "", s)
    s = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{[^{}]*\}(\^\d)?\s*$", "", s)
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf)\{([^{}]*)\}", r"\1", s)
    s = s.strip().rstrip(".").strip()
    # `x = 5`, `k=3`: keep the right side when the left is a short variable name.
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    s = s.replace(" ", "")
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)
    return s.rstrip(".")


def to_number(s: str | None) -> float | None:
    r"""The value of `s` if the whole of it is a number: `18`, `-1,000.5`, `1/2`, `\frac{1}{2}`,
    `-\dfrac{9}{7}`, `$18.00`, `25%`. Anything else (`x^2+1`, `\sqrt{2}`, `18 eggs`) gives None."""
    if s is None:
        return None
    t = s.strip().replace("\u2212", "-").replace(" ", "")
    t = t.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    t = t.replace("\\!", "").replace("\\,", "").replace("{,}", ",").rstrip(".")
    t = re.sub(r"^(-?)\\[dt]?frac\{(-?[\d.,]+)\}\{(-?[\d.,]+)\}$", r"\1\2/\3", t)
    t = re.sub(r"^(-?)\\[dt]?frac(\d)(\d)$", r"\1\2/\3", t)
    if not re.fullmatch(rf"-?(?:{_NUM})(?:/-?(?:{_NUM}))?", t):
        return None
    c = canonical_number(t)
    return None if c is None else float(Fraction(c))


def _math_answer(span: str) -> str | None:
    span = _strip_math_delimiters(span)
    if _is_prose(span):  # `2 vertical asymptotes` -> 2; prose with no number stays text
        num = _number_in_span(span)
        if num is not None:
            return num
    out = normalize_math(span)
    return out or None


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; use one of {', '.join(KINDS)}")


def extract_answer(text: str, kind: str, last_number: bool = True) -> str | None:
    r"""The model's final answer in `text`, normalised; None if there is none.

    Sources, in the paper's order: the last `\boxed{}`; else the last `Final Answer:` line;
    else the last `#### N` (GSM8K's own format); else (unless `last_number` is False: only an
    answer the text states as final) the last number anywhere. A source that
    yields nothing usable falls through to the one before it / the next source. For the
    "numeric" kind the answer is a canonical number string (`"1000"`, `"18"`, `"-0.5"`, `"1/2"`);
    for "math" a `normalize_math` string; for "choice" a letter (`extract_choice`).
    Also extracts gold answers: a GSM8K solution gives its `#### N`, a MATH solution its box.
    """
    check_kind(kind)
    if kind == "choice":
        return extract_choice(text)
    if kind == "code":
        raise ValueError("code answers are graded by running code, not by extracting an answer")
    pick = _number_in_span if kind == "numeric" else _math_answer
    for box in reversed(boxed_contents(text)):
        ans = pick(box) if kind == "numeric" else (normalize_math(box) or None)
        if ans is not None:
            return ans
    for span in reversed(final_answer_spans(text)):
        ans = pick(span)
        if ans is not None:
            return ans
    hashes = re.findall(r"####\s*([^\n]*)", text)
    for span in reversed(hashes):
        ans = _number_in_span(span) if kind == "numeric" else pick(span)
        if ans is not None:
            return ans
    nums = _numbers(text) if last_number else []
    return nums[-1] if nums else None


def answers_match(pred: str | None, gold: str | None, kind: str) -> bool:
    """True if the extracted prediction equals the gold answer.

    Numbers are compared as the paper does: both parsed, rounded to 2 decimals, equal. For
    MATH, answers that are not both numbers are compared as `normalize_math` strings. Choice
    answers compare letters. None (nothing extracted) never matches.
    """
    check_kind(kind)
    if pred is None or gold is None:
        return False
    if kind == "choice":
        return pred.strip().upper() == gold.strip().strip("()").upper()
    p, g = to_number(pred), to_number(gold)
    if p is None and kind == "numeric":
        p = to_number(_number_in_span(pred) or "")
    if g is None and kind == "numeric":
        g = to_number(_number_in_span(gold) or "")
    if p is not None and g is not None:
        return round(p, 2) == round(g, 2)
    if kind == "numeric":
        return False
    return normalize_math(pred) == normalize_math(gold)


def grade(text: str, gold: str, kind: str) -> bool:
    """Extract the answer from a model output and compare it with the gold answer."""
    return answers_match(extract_answer(text, kind), gold, kind)


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    r"""The option letter a model chose, or None.

    In order: the last `\boxed{X}`; the first standalone letter of the last `Final Answer:`
    line; the last `answer is (X)` / `answer: X`; the last `(X)`; a reply that is just `X`,
    `X.` or `X)`. A bare capital letter inside prose is not taken (`A store sells...`).
    """
    L = re.escape(letters)
    letter = rf"(?<![A-Za-z])\(?([{L}])\)?(?![A-Za-z])"
    for box in reversed(boxed_contents(text)):
        m = re.search(letter, box.replace("\\text{", "{"))
        if m:
            return m.group(1)
    for span in reversed(final_answer_spans(text)):
        m = re.search(letter, span)
        if m:
            return m.group(1)
    # case-insensitive words, case-sensitive letter: "the answer is a bank" names no option
    hits = re.findall(rf"(?i:answer\s*(?:is|:)\s*(?:option\s*)?)\(?([{L}])\)?(?![A-Za-z])", text)
    if hits:
        return hits[-1]
    hits = re.findall(rf"\(([{L}])\)", text)
    if hits:
        return hits[-1]
    m = re.fullmatch(rf"\s*\(?([{L}])[).:]?\s*", text)
    return m.group(1) if m else None

