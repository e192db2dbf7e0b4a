"""Familiarity token by token: which words of a response the untuned model finds surprising.

The paper reports one number per response, its perplexity under the untuned model (section 3).
This module opens that number up. For each response it shows every scored token (the response
and its end-of-turn token, exactly the tokens `data.render` trains on) coloured by its negative
log-likelihood, and it summarises, over a whole set, which tokens carry one source's NLL that
another source rarely writes: what makes, say, human answers unfamiliar to the model.

The NLLs are not recomputed here: they are the per-token values that perplexity.py's
`dataset_perplexity(..., per_token=True)` sums into each example's perplexity (nll.py), so
exp(mean of the shown values) is the perplexity printed beside them.

Three outputs, from `python perplexity.py --source human self --show 2 [--html view.html]`:
  - terminal: sources one after another per question, each with its perplexity, tokens on a
    background colour per NLL bin (a legend first); colour only on a terminal, unless NO_COLOR
    is set (off) or FORCE_COLOR is (on);
  - HTML: one self-contained page (no scripts, no external fonts or files), sources side by side
    per question, a token's NLL and probability on hover, an inline-SVG histogram of token NLL
    per source;
  - a summary over the whole measured set: per source, how tokens and NLL split over token
    classes (numbers, words, symbols, whitespace, GSM8K's `<<...>>` calculator annotations, the
    end-of-turn token), and per source the tokens with the largest share of its total NLL that
    are at least RARE_FACTOR times rarer (per 1000 tokens) in the most familiar source's responses.

Tokens are shown as the characters `tokenizers` maps them to in the rendered chat; a byte-level
token that holds part of a multi-byte character shares that character with its neighbour, and
the character is shown once, with the first of them.
"""

from __future__ import annotations

import html
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from data import chat_messages, render

# NLL bins in nats (upper edges) and their colours: p > 0.78, > 0.37, > 0.14, > 0.02, > 3e-4, less.
BINS = (0.25, 1.0, 2.0, 4.0, 8.0, math.inf)
COLOURS = ("#d9f0d3", "#a6dba0", "#fee08b", "#fdae61", "#f46d43", "#d73027")
RARE_FACTOR = 4  # "rare in the other source": at least this many times rarer per 1000 tokens
MIN_COUNT = 3  # a token must occur this often in a source to enter its table (noise otherwise)
ANNOTATION = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>


def nll_bin(nll: float) -> int:
    return next(i for i, edge in enumerate(BINS) if nll < edge)


def bin_label(i: int) -> str:
    lo = 0.0 if i == 0 else BINS[i - 1]
    return f"≥{lo:g}" if BINS[i] == math.inf else f"{lo:g}–{BINS[i]:g}"


@dataclass
class Token:
    text: str  # the characters shown for it (may be "" for the second half of a character)
    nll: float
    kind: str  # token class, see token_class


@dataclass
class Shown:
    """One source's response to one question, token by token."""
    source: str
    qid: str
    question: str
    ppl: float
    tokens: list[Token]


def scored_tokens(tok, prompt: str, response: str, token_ids: list[int], token_nlls: list[float]) -> list[Token]:
    """The scored tokens of a (prompt, response) with their text, NLL and class. `token_ids` and
    `token_nlls` are perplexity.dataset_perplexity(per_token=True)'s; the rendering is checked
    against them, so a shown value can never sit on the wrong token."""
    r = render(tok, prompt, response)
    text = tok.render_chat(chat_messages(prompt, response), add_generation_prompt=False)
    ids, offsets = tok.encode_with_offsets(text)
    scored = [t for t in range(1, len(ids)) if r.mask[t]]  # collate never scores position 0
    if ids != r.ids or [ids[t] for t in scored] != list(token_ids) or len(token_nlls) != len(scored):
        raise ValueError("the per-token values do not belong to this rendering")
    notes = [m.span() for m in ANNOTATION.finditer(text)]
    out, shown_to = [], 0  # shown_to: characters before it are already shown
    for t, nll in zip(scored, token_nlls):
        a, b = offsets[t]
        piece = text[max(a, shown_to):b]
        shown_to = max(shown_to, b)
        in_note = any(x <= a and b <= y for x, y in notes)
        out.append(Token(piece, nll, token_class(piece, ids[t] == tok.eot_id, in_note)))
    return out


def token_class(piece: str, is_eot: bool, in_annotation: bool) -> str:
    s = piece.strip()
    if is_eot:
        return "end-of-turn"
    if in_annotation:
        return "<<…>> annotation"
    if not s:
        return "whitespace"
    if any(c.isdigit() for c in s):
        return "number"
    if not any(c.isalpha() for c in s):
        return "symbol"
    return "word"


def collect(tok, results: list[dict], records: dict[str, list[dict]]) -> list[Shown]:
    """Every measured response of every source as Shown, from perplexity.py's results (with
    per-token values) and each source's records (the prompts and responses measured)."""
    out = []
    for r in results:
        recs = records[r["source"]]
        for e in r["per_example"]:
            rec = recs[e["index"]]
            out.append(Shown(r["source"], rec["id"], rec["question"], e["ppl"],
                             scored_tokens(tok, rec["prompt"], rec["response"], e["token_ids"], e["token_nlls"])))
    return out


def first_questions(shown: list[Shown], n: int) -> list[tuple[str, str, list[Shown]]]:
    """(id, question, its responses in source order) for the first n questions, in set order."""
    order, by_q = [], {}
    for s in shown:
        if s.qid not in by_q:
            order.append(s.qid)
            by_q[s.qid] = []
        by_q[s.qid].append(s)
    return [(q, by_q[q][0].question, by_q[q]) for q in order[:n]]


# ----------------------------------------------------------------------------------------------
# Terminal


def use_colour(stream) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    return bool(os.environ.get("FORCE_COLOR")) or stream.isatty()


def _ansi(text: str, i: int) -> str:
    r, g, b = (int(COLOURS[i][k:k + 2], 16) for k in (1, 3, 5))
    return f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}\x1b[0m"


def terminal(questions, colour: bool) -> str:
    def paint(t: Token) -> str:
        # Newlines are kept as line breaks (shown as ⏎ so that a coloured one is visible), and the
        # background never runs past the end of a line.
        parts = t.text.split("\n")
        shown = [p + ("⏎" if k < len(parts) - 1 else "") for k, p in enumerate(parts)]
        if colour:
            shown = [_ansi(p, nll_bin(t.nll)) if p else p for p in shown]
        return "\n".join(shown)

    legend = "token NLL (nats): " + "  ".join(
        (_ansi(f" {bin_label(i)} ", i) if colour else f"[{bin_label(i)}]") for i in range(len(BINS)))
    lines = [legend]
    if not colour:
        lines.append("(no colour: not a terminal or NO_COLOR set; FORCE_COLOR=1 forces it)")
    for k, (qid, question, responses) in enumerate(questions):
        lines.append(f"\n=== question {k + 1} ({qid}): {question}")
        for s in responses:
            mean = sum(t.nll for t in s.tokens) / len(s.tokens)
            lines.append(f"--- {s.source}: perplexity {s.ppl:.3f} ({len(s.tokens)} tokens, mean NLL {mean:.3f})")
            lines.append("".join(paint(t) for t in s.tokens))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The summary over the set


def token_key(piece: str) -> str:
    """How a token is named in the tables: stripped of surrounding spaces (" total" and "total"
    count together), whitespace named."""
    s = piece.strip()
    if s:
        return s
    return "⏎" * piece.count("\n") if "\n" in piece else "␠" * max(1, len(piece))


def summarize_sources(shown: list[Shown]) -> dict:
    """Per source: totals, the token-class breakdown, and per-token counts and NLL sums."""
    out: dict[str, dict] = {}
    for s in shown:
        d = out.setdefault(s.source, {"responses": 0, "tokens": 0, "nll": 0.0, "ppl_sum": 0.0,
                                      "classes": {}, "keys": {}})
        d["responses"] += 1
        d["ppl_sum"] += s.ppl
        for t in s.tokens:
            d["tokens"] += 1
            d["nll"] += t.nll
            key_of_token = token_key(t.text) if t.kind != "end-of-turn" else "<eot>"
            for table, key in (("classes", t.kind), ("keys", key_of_token)):
                c = d[table].setdefault(key, [0, 0.0])
                c[0] += 1
                c[1] += t.nll
    for d in out.values():
        d["mean_ppl"] = d["ppl_sum"] / d["responses"]
    return out


def contrast(stats: dict, source: str, reference: str, top: int = 10) -> tuple[list[dict], float]:
    """`source`'s tokens with the largest share of its total NLL among those at least RARE_FACTOR
    times rarer per 1000 tokens in `reference` (or absent from it), and the share of `source`'s
    NLL that all such tokens carry together."""
    a, b = stats[source], stats[reference]
    rows = []
    for key, (count, nll) in a["keys"].items():
        rate_a = 1000 * count / a["tokens"]
        rate_b = 1000 * b["keys"].get(key, [0, 0.0])[0] / b["tokens"]
        if rate_b * RARE_FACTOR <= rate_a:
            rows.append({"token": key, "count": count, "nll_share": nll / a["nll"], "mean_nll": nll / count,
                         "per_1000": rate_a, "per_1000_reference": rate_b})
    total = sum(r["nll_share"] for r in rows)
    rows = [r for r in rows if r["count"] >= MIN_COUNT]
    rows.sort(key=lambda r: (-r["nll_share"], r["token"]))
    return rows[:top], total


def reference_source(stats: dict) -> str:
    """The most familiar source of the set (lowest mean perplexity): the one others are
    contrasted with."""
    return min(stats, key=lambda s: (stats[s]["mean_ppl"], s))


def summary_text(stats: dict) -> str:
    lines = ["=== where the NLL sits, by token class (share of the source's tokens / of its total NLL; mean NLL)"]
    classes = sorted({c for d in stats.values() for c in d["classes"]})
    for source, d in stats.items():
        lines.append(f"{source}: {d['responses']} responses, {d['tokens']} tokens, mean perplexity {d['mean_ppl']:.3f}")
        for c in sorted(classes, key=lambda c: -d["classes"].get(c, [0, 0.0])[1]):
            n, nll = d["classes"].get(c, [0, 0.0])
            if n:
                lines.append(f"  {c:<18} {n / d['tokens']:>6.1%} of tokens  {nll / d['nll']:>6.1%} of NLL  "
                             f"mean {nll / n:.2f}")
    if len(stats) > 1:
        ref = reference_source(stats)
        for source in stats:
            if source == ref:
                continue
            rows, total = contrast(stats, source, ref)
            lines.append(f"\n=== {source} vs {ref} (the most familiar source): tokens at least {RARE_FACTOR}x rarer "
                         f"in {ref}'s responses carry {total:.1%} of {source}'s NLL; the largest "
                         f"(at least {MIN_COUNT} occurrences):")
            lines.append(f"  {'token':<12} {'count':>6} {'NLL share':>9} {'mean NLL':>9} "
                         f"{'per 1000':>9} {'in ' + ref:>12}")
            for r in rows:
                lines.append(f"  {r['token']!r:<12} {r['count']:>6} {r['nll_share']:>9.1%} {r['mean_nll']:>9.2f} "
                             f"{r['per_1000']:>9.1f} {r['per_1000_reference']:>12.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# HTML


def histogram_svg(nlls: list[float], width: int = 440, height: int = 130) -> str:
    """Inline SVG: the share of tokens per 0.5-nat NLL bin, 12+ in the last; bars in the view's
    colours; the mean NLL as a line."""
    step, top = 0.5, 12.0
    nb = int(top / step) + 1
    counts = [0] * nb
    for v in nlls:
        counts[min(nb - 1, int(v / step))] += 1
    total = max(1, len(nlls))
    peak = max(counts) / total or 1.0
    left, bottom, plot_h = 28, height - 18, height - 30
    bw = (width - left - 4) / nb
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="histogram of token NLL">']
    for i, c in enumerate(counts):
        h = plot_h * (c / total) / peak
        parts.append(f'<rect x="{left + i * bw:.1f}" y="{bottom - h:.1f}" width="{bw - 1:.1f}" height="{h:.1f}" '
                     f'fill="{COLOURS[nll_bin(i * step)]}" stroke="#555" stroke-width="0.3">'
                     f'<title>NLL {i * step:g}{"+" if i == nb - 1 else f"–{(i + 1) * step:g}"}: {c} tokens '
                     f'({c / total:.1%})</title></rect>')
    mean = sum(nlls) / total
    mx = left + min(mean, top + step) / step * bw
    parts.append(f'<line x1="{mx:.1f}" y1="{bottom - plot_h}" x2="{mx:.1f}" y2="{bottom}" stroke="#000" '
                 f'stroke-dasharray="3,2"><title>mean NLL {mean:.3f}</title></line>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{width - 4}" y2="{bottom}" stroke="#000"/>')
    for v in (0, 4, 8, 12):
        parts.append(f'<text x="{left + v / step * bw:.1f}" y="{height - 5}" font-size="10" '
                     f'text-anchor="middle">{v}{"+" if v == 12 else ""}</text>')
    parts.append(f'<text x="{left - 3}" y="{bottom - plot_h + 8}" font-size="10" text-anchor="end">'
                 f'{peak:.0%}</text>')
    parts.append(f'<text x="{left - 3}" y="{bottom}" font-size="10" text-anchor="end">0</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body { font-family: sans-serif; margin: 1.2em; color: #111; }
.row { display: flex; gap: 1em; align-items: flex-start; }
.col { flex: 1; min-width: 0; border: 1px solid #ccc; border-radius: 4px; padding: 0.5em; }
.resp { font-family: monospace; white-space: pre-wrap; line-height: 1.6; font-size: 13px; }
.tok { border-radius: 2px; }
.q { background: #f4f4f4; padding: 0.5em; border-radius: 4px; white-space: pre-wrap; }
h3 { margin: 0 0 0.3em 0; font-size: 1em; }
.legend span { padding: 0 0.4em; margin-right: 0.2em; font-family: monospace; }
pre.summary { background: #fafafa; border: 1px solid #ddd; padding: 0.6em; font-size: 12px; white-space: pre-wrap; }
"""


def html_page(questions, shown: list[Shown], stats: dict, title: str) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
           f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
           '<p class="legend">token NLL under the untuned model (nats), hover a token for its value: ' +
           "".join(f'<span style="background:{COLOURS[i]}">{e(bin_label(i))}</span>' for i in range(len(BINS))) +
           "</p>"]
    for k, (qid, question, responses) in enumerate(questions):
        out.append(f'<h2>Question {k + 1} <small>({e(qid)})</small></h2><div class="q">{e(question)}</div>')
        out.append('<div class="row">')
        for s in responses:
            toks = "".join(
                f'<span class="tok" style="background:{COLOURS[nll_bin(t.nll)]}" data-nll="{t.nll:.6f}" '
                f'title="NLL {t.nll:.2f}, p = {math.exp(-t.nll):.3f} ({e(t.kind)})">{e(t.text)}</span>'
                for t in s.tokens)
            out.append(f'<div class="col"><h3>{e(s.source)}: perplexity {s.ppl:.3f} '
                       f'({len(s.tokens)} tokens)</h3><div class="resp">{toks}</div></div>')
        out.append("</div>")
    out.append("<h2>Token NLL over the whole set, per source</h2><div class=\"row\">")
    for source, d in stats.items():
        nlls = [t.nll for s in shown if s.source == source for t in s.tokens]
        out.append(f'<div class="col"><h3>{e(source)}: mean perplexity {d["mean_ppl"]:.3f}, '
                   f'{d["responses"]} responses, {d["tokens"]} tokens</h3>{histogram_svg(nlls)}</div>')
    out.append("</div><h2>Summary</h2>")
    out.append(f'<pre class="summary">{e(summary_text(stats))}</pre></body></html>\n')
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Entry point (perplexity.py --show / --html)


def report(tok, results: list[dict], records: dict[str, list[dict]], show: int | None, html_path: str | None,
           title: str, stream=None) -> dict:
    """Print the terminal view of the first `show` questions (if given) and the summary; write
    the HTML page (if html_path) for the first `show` (default 2) questions. Returns the stats."""
    stream = stream or sys.stdout
    shown = collect(tok, results, records)
    stats = summarize_sources(shown)
    questions = first_questions(shown, show or 2)
    if show:
        print(terminal(questions, use_colour(stream)), file=stream)
    print("\n" + summary_text(stats), file=stream)
    if html_path:
        # A plain write: a page cut short by a crash is harmless, and nothing reads it back.
        Path(html_path).write_text(html_page(questions, shown, stats, title), encoding="utf-8")
        print(f"wrote {html_path}", file=stream)
    return stats
