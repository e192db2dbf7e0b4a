"""Answer extraction and grading (grading.py), the accuracy interval and likelihood choice
(eval.py sections 1-2), table-driven.

Each row is a realistic model output, including what small (135M) models really write:
repeated lines, output cut off mid-sentence, no number at all, `Final Answer:` several times.
"""

import math

import pytest

import eval as ev
import tasks
from eval import accuracy_ci, choice_logprobs
from grading import answers_match, boxed_contents, extract_answer, extract_choice, grade, normalize_math, to_number

JANET = ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
         "She makes 9 * 2 = $18 every day at the farmer's market.\n")

# (model output, answer kind (tasks.TASKS: gsm8k is "numeric", math "math"), gold answer,
#  expected extraction, expected match)
CASES = [
    # --- GSM8K: the paper's format and its variants
    (JANET + "Final Answer: 18", "numeric", "18", "18", True),
    (JANET + "Final Answer: $18.00", "numeric", "18", "18", True),
    ("The shop sold 1,000 cups.\nFinal Answer: 1,000", "numeric", "1000", "1000", True),
    ("Final Answer: 1000", "numeric", "1,000", "1000", True),
    ("Final Answer: $1,234,567.50", "numeric", "1234567.5", "1234567.5", True),
    ("Final Answer: 12\nWait, I made a mistake. 3 * 5 = 15.\nFinal Answer: 15", "numeric", "15",
     "15", True),  # several Final Answer lines: the last wins
    ("Final Answer: 18\nFinal Answer: 18\nFinal Answer: 18\nFinal Answer: 18", "numeric", "18",
     "18", True),  # repeated lines
    (JANET + "Final Answer: 18\nFinal Answer:", "numeric", "18", "18", True),  # cut off after
    ("She makes 9 * 2 = 18 dollars.\n" * 4 + "She makes 9 * 2 =", "numeric", "18", "2", False),
    ("I am not sure how to solve this problem. Let me think again about it.", "numeric", "18",
     None, False),  # no number at all
    ("", "numeric", "18", None, False),
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
     "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "numeric", "18", "18", True),
    ("So she makes 9 times 2 which is 18 dollars a day.", "numeric", "18", "18", True),
    ("The temperature fell to -7 degrees.\nFinal Answer: -7", "numeric", "-7", "-7", True),
    ("Final Answer: \u22124", "numeric", "-4", "-4", True),  # unicode minus
    ("He lost money.\nFinal Answer: -$5", "numeric", "-5", "-5", True),
    ("The difference is 10-4", "numeric", "6", "4", False),  # a subtraction, not -4
    ("Final Answer: 2.50 dollars", "numeric", "2.5", "2.5", True),
    ("Final Answer: 0.50", "numeric", "0.5", "0.5", True),
    ("Final Answer: 25%", "numeric", "25", "25", True),
    ("Final Answer: 18 eggs per day.", "numeric", "18", "18", True),
    ("Final Answer: 16 - 3 - 4 = 9 eggs, 9 * 2 = $18", "numeric", "18", "18", True),
    ("The total is \\boxed{18}.\nFinal Answer: 20", "numeric", "18", "18", True),  # boxed first
    ("Final Answer: 3/4", "numeric", "0.75", "3/4", True),
    ("Final Answer: \\frac{1}{2}", "numeric", "0.5", "1/2", True),
    ("Final Answer: 3.333", "numeric", "3.33", "3.333", True),  # rounded to 2 decimals
    ("Final Answer: 3.34", "numeric", "3.33", "3.34", False),
    ("**Final Answer:** 18", "numeric", "18", "18", True),
    ("**Final Answer**: 18", "numeric", "18", "18", True),
    ("so the final answer: 7", "numeric", "7", "7", True),  # case-insensitive
    ("Final Answer:\n18", "numeric", "18", "18", True),
    ("Final Answer: 18\n\nQuestion: Tom has 5 apples and eats 2.", "numeric", "18", "18", True),
    ("Final Answer: 17", "numeric", "18", "17", False),
    ("The numbers are 1, 2, 3", "numeric", "3", "3", True),  # a list, not 123
    ("Final Answer: \\$18", "numeric", "18", "18", True),
    # --- MATH: boxed LaTeX, compared numerically when both are numbers, else as strings
    ("So $x = \\boxed{\\frac{1}{2}}$.", "math", "0.5", "\\frac{1}{2}", True),
    ("Expanding gives $\\boxed{x^2+1}$.", "math", "x^2 + 1", "x^2+1", True),
    ("Expanding gives $\\boxed{x^2-1}$.", "math", "x^2+1", "x^2-1", False),
    ("First \\boxed{3}, but correcting: \\boxed{\\frac{\\sqrt{3}}{2}}", "math",
     "\\dfrac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", True),  # last box, nested braces
    ("$1+\\dfrac{2}{7}=\\boxed{\\dfrac{9}{7}}$", "math", "\\frac{9}{7}", "\\frac{9}{7}", True),
    ("The point is $\\boxed{\\left(2, -3\\right)}$.", "math", "(2,-3)", "(2,-3)", True),
    ("The angle is $\\boxed{30^\\circ}$.", "math", "30", "30", True),
    ("The side is $\\boxed{5\\text{ cm}}$.", "math", "5", "5", True),
    ("The winner is $\\boxed{\\text{Evelyn}}$.", "math", "\\text{Evelyn}", "Evelyn", True),
    ("It costs $\\boxed{\\$18.90}$.", "math", "18.90", "18.90", True),
    ("That is $\\boxed{25\\%}$.", "math", "25", "25", True),
    ("Solving, $\\boxed{x=5}$.", "math", "5", "5", True),
    ("Final Answer: $\\frac{9}{7}$", "math", "\\frac{9}{7}", "\\frac{9}{7}", True),
    ("Final Answer: The answer is $x^2+1$.", "math", "x^2+1", "x^2+1", True),
    ("Final Answer: 2 vertical asymptotes", "math", "2", "2", True),
    ("Final Answer: 7.", "math", "7", "7", True),
    ("So \\boxed{3}. Checking again, \\boxed{\\frac{1", "math", "3", "3", True),  # unclosed box
    ("Therefore the graph has 2 vertical asymptotes", "math", "2", "2", True),  # last number
    ("$\\boxed{2\\sqrt2}$", "math", "2\\sqrt{2}", "2\\sqrt{2}", True),
    ("$\\boxed{1,\\!000}$", "math", "1000", "1,000", True),
    ("$\\boxed{[-2, 5)}$", "math", "[-2,5)", "[-2,5)", True),
    ("$\\boxed{.5}$", "math", "\\frac12", "0.5", True),
    ("I do not know.", "math", "\\frac{9}{7}", None, False),
]


@pytest.mark.parametrize("text,kind,gold,expected,match", CASES,
                         ids=[f"{i}-{c[1]}" for i, c in enumerate(CASES)])
def test_extract_and_match(text, kind, gold, expected, match):
    got = extract_answer(text, kind)
    assert got == expected
    assert answers_match(got, gold, kind) is match
    assert grade(text, gold, kind) is match


def test_each_task_names_the_kind_its_answers_are_graded_by():
    assert {t: info.kind for t, info in tasks.TASKS.items()} == {
        "gsm8k": "numeric", "math": "math", "math-all": "math", "boolq": "choice", "csqa": "choice",
        "mmlu": "choice", "piqa": "choice", "humaneval": "code"}


def test_gold_answers_come_out_of_the_datasets_own_solutions():
    gsm = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
           "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.\n#### 18")
    assert extract_answer(gsm, "numeric") == "18"
    math_sol = ("Solving, we get $n=1$. Therefore, the only value $x$ that satisfies the equation "
                "is $1+\\dfrac{2}{7}=\\boxed{\\dfrac{9}{7}}$.")
    assert extract_answer(math_sol, "math") == "\\frac{9}{7}"


def test_none_never_matches():
    assert not answers_match(None, "18", "numeric")
    assert not answers_match(None, None, "math")


def test_unknown_task_is_a_clear_error(capsys):
    with pytest.raises(SystemExit, match="unknown task 'gsm9k'"):  # the CLI names the task
        ev.main(["extract", "--task", "gsm9k", "--text", "Final Answer: 3"])
    with pytest.raises(ValueError, match="unknown answer kind 'gsm9k'"):
        extract_answer("Final Answer: 3", "gsm9k")
    with pytest.raises(ValueError, match="running code"):
        extract_answer("def f(): pass", "code")
    with pytest.raises(SystemExit, match="running code"):
        ev.main(["extract", "--task", "humaneval", "--text", "def f(): pass"])
    ev.main(["extract", "--task", "gsm8k", "--text", "Final Answer: 1,000", "--gold", "1000"])
    assert capsys.readouterr().out == "extracted: '1000'\nmatches gold '1000': True\n"


def test_helpers():
    assert boxed_contents("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == ["\\frac{1}{2}", "x^{2}"]
    assert normalize_math("\\left( \\dfrac{1}{2}, 3 \\right).") == "(\\frac{1}{2},3)"
    assert to_number("-\\dfrac{9}{7}") == pytest.approx(-9 / 7)
    assert to_number("x^2+1") is None and to_number("\\sqrt{2}") is None


CHOICES = [
    ("Final Answer: (B) bank", "ABCDE", "B"),
    ("The answer is C.", "ABCDE", "C"),
    ("A store sells apples. Looking at the options, (D) fits best.", "ABCDE", "D"),
    ("A", "ABCDE", "A"),
    ("B.", "ABCDE", "B"),
    ("A man walks into a bar.", "ABCDE", None),  # a capital A in prose is not a choice
    ("So the answer is $\\boxed{E}$", "ABCDE", "E"),
    ("Final Answer: A\nHmm, no.\nFinal Answer: C", "ABCDE", "C"),
    ("Final Answer: (E)", "ABCD", None),  # not one of the allowed letters
    ("I cannot decide.", "ABCDE", None),
    ("The answer is a bank.", "ABCDE", None),  # the article "a" is not option A
    ("My answer: e-mail it.", "ABCDE", None),
    ("the ANSWER IS (b)... no, the answer is D", "ABCDE", "D"),  # the words in any case
]


@pytest.mark.parametrize("text,letters,expected", CHOICES)
def test_extract_choice(text, letters, expected):
    assert extract_choice(text, letters) == expected


def test_choice_task_grading():
    assert grade("Final Answer: (B) bank", "B", "choice")
    assert not grade("Final Answer: (B) bank", "C", "choice")


# --- Wilson interval: k successes in n, z = 1.96 (95%)


def _wilson_by_hand(k, n, z=1.959963984540054):
    p = k / n
    center = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = (z / (1 + z**2 / n)) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return center - half, center + half


def test_wilson_interval_8_of_10():
    acc, lo, hi = accuracy_ci([True] * 8 + [False] * 2)
    assert acc == 0.8
    # Textbook value for 8/10: (0.4902, 0.9433).
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert (lo, hi) == pytest.approx(_wilson_by_hand(8, 10), abs=1e-12)


def test_wilson_interval_boundaries():
    z2 = 1.959963984540054**2
    acc, lo, hi = accuracy_ci([False] * 10)  # 0/n: lo = 0, hi = z^2 / (n + z^2)
    assert (acc, lo) == (0.0, 0.0) and hi == pytest.approx(z2 / (10 + z2), rel=1e-12)
    acc, lo, hi = accuracy_ci([True] * 10)  # n/n: hi = 1, lo = n / (n + z^2)
    assert (acc, hi) == (1.0, 1.0) and lo == pytest.approx(10 / (10 + z2), rel=1e-12)
    acc, lo, hi = accuracy_ci([True, False] * 500)  # large n: close to p +- 1.96 sqrt(pq/n)
    assert acc == 0.5 and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 1000), rel=1e-2)
    with pytest.raises(ValueError):
        accuracy_ci([])


# --- Multiple choice by likelihood


def test_choice_logprobs_raw_and_normalized_disagree():
    prompt = "Q: What is the capital of France?\nA:"
    table = {  # option -> (sum log-prob, tokens), as a model might score them
        " Lyon": (-3.0, 1),                                  # short and wrong: best raw sum
        " Paris, the capital city of France": (-4.0, 8),     # long and right: best per token
        " Berlin": (-6.0, 1),
    }
    calls = []

    def score_fn(p, cont):
        calls.append((p, cont))
        return table[cont]

    options = list(table)
    raw, norm = choice_logprobs(score_fn, prompt, options)
    assert options[raw] == " Lyon"
    assert options[norm] == " Paris, the capital city of France"
    assert calls == [(prompt, o) for o in options]  # each option scored once, with the prompt


def test_choice_logprobs_ties_and_errors():
    raw, norm = choice_logprobs(lambda p, c: (-2.0, 2), "q", ["a", "b", "c"])
    assert (raw, norm) == (0, 0)  # ties go to the first option
    with pytest.raises(ValueError):
        choice_logprobs(lambda p, c: (-1.0, 0), "q", ["a"])
    with pytest.raises(ValueError):
        choice_logprobs(lambda p, c: (-1.0, 1), "q", [])
