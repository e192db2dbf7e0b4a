"""tokenview.py (perplexity.py --show / --html): the shown NLLs are the ones the perplexity is made
of, and equal HF transformers' per-token values; the HTML page is well-formed, self-contained and
holds every token; the summary's numbers by hand."""

import json
import math
import re
from html.parser import HTMLParser

import pytest
import torch

import perplexity
import sources
import tokenview
from model import Transformer
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

RECORDS = {  # two sources answering the same three questions
    "terse": [{"id": f"q{i}", "question": f"What is {i} + {i}?", "prompt": f"What is {i} + {i}?",
               "response": f"Final Answer: {2 * i}"} for i in range(3)],
    "wordy": [{"id": f"q{i}", "question": f"What is {i} + {i}?", "prompt": f"What is {i} + {i}?",
               "response": f"<<{i}+{i}={2 * i}>> Adding {i} and {i} gives {2 * i}.\n\nFinal Answer: {2 * i}"}
              for i in range(3)],
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return Transformer.from_pretrained(tiny_model_dir, "fp32"), Tokenizer.from_folder(tiny_model_dir)


@pytest.fixture(scope="module")
def measured(tiny):
    model, tok = tiny
    results = []
    for name, recs in RECORDS.items():
        r = perplexity.dataset_perplexity(model, tok, [(x["prompt"], x["response"]) for x in recs], per_token=True)
        results.append({"source": name, **r})
    return results, tokenview.collect(tok, results, RECORDS)


def test_shown_nlls_give_the_reported_perplexity(tiny, measured, tiny_model_dir):
    model, tok = tiny
    results, shown = measured
    plain = {name: perplexity.dataset_perplexity(model, tok, [(x["prompt"], x["response"]) for x in recs])
             for name, recs in RECORDS.items()}  # the path without per-token values
    assert len(shown) == 6
    for s in shown:
        k = int(s.qid[1:])
        e = plain[s.source]["per_example"][k]
        assert len(s.tokens) == e["tokens"]
        assert math.exp(sum(t.nll for t in s.tokens) / len(s.tokens)) == pytest.approx(e["ppl"], rel=1e-5)
    # and each shown value is HF transformers' -log p of that token
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for s in shown[:2] + shown[3:5]:
        rec = RECORDS[s.source][int(s.qid[1:])]
        head = tok.encode(tok.render_chat([{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True))
        ids = tok.encode(tok.render_chat([{"role": "user", "content": rec["prompt"]},
                                          {"role": "assistant", "content": rec["response"]}], add_generation_prompt=False))
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        want = [-logp[t - 1, ids[t]].item() for t in range(len(head), ids.index(tok.eot_id, len(head)) + 1)]
        assert [t.nll for t in s.tokens] == pytest.approx(want, abs=1e-4)
        assert "".join(t.text for t in s.tokens) == rec["response"] + tok.eot_token
        assert s.tokens[-1].kind == "end-of-turn"


class Checker(HTMLParser):
    """Tags must nest and close; collects the tokens' spans and any way to load something."""
    VOID = {"meta", "br", "img", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.tokens, self.loads, self.cur = [], [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "link", "img", "iframe") or "src" in a or "href" in a:
            self.loads.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)
        if "data-nll" in a:
            self.cur = [float(a["data-nll"]), ""]
            self.tokens.append(self.cur)

    def handle_startendtag(self, tag, attrs):
        if tag not in {"rect", "line", "meta"} and tag not in self.VOID:
            raise AssertionError(f"self-closed <{tag}/>")

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "span":
            self.cur = None

    def handle_data(self, data):
        if self.cur is not None:
            self.cur[1] += data


def test_html_is_well_formed_self_contained_and_holds_every_token(measured, tmp_path):
    results, shown = measured
    stats = tokenview.summarize_sources(shown)
    page = tokenview.html_page(tokenview.first_questions(shown, 3), shown, stats, "a <title> & more")
    p = Checker()
    p.feed(page)
    p.close()
    assert p.stack == [] and p.loads == []
    assert not re.search(r"url\(|@import|@font-face", page)
    assert page.count("<svg") == 2  # one histogram per source
    want = [(t.nll, t.text) for s in sorted(shown, key=lambda s: (int(s.qid[1:]), s.source != "terse"))
            for t in s.tokens]
    assert len(p.tokens) == len(want)
    for (nll, text), (w_nll, w_text) in zip(p.tokens, want):
        assert text == w_text and nll == pytest.approx(w_nll, abs=1e-6)
    # per response, the page's values give the perplexity in its heading
    assert "terse: perplexity" in page and "wordy: perplexity" in page


def test_terminal_view_colours_and_legend(measured):
    _, shown = measured
    qs = tokenview.first_questions(shown, 1)
    plain = tokenview.terminal(qs, colour=False)
    assert "\x1b[" not in plain and "[≥8]" in plain
    assert f"--- terse: perplexity {qs[0][2][0].ppl:.3f}" in plain
    coloured = tokenview.terminal(qs, colour=True)
    stripped = re.sub(r"\x1b\[[0-9;]*m", "", coloured)
    assert stripped.count("perplexity") == 2 and " ≥8 " in stripped
    assert RECORDS["wordy"][0]["response"].replace("\n", "⏎\n") in stripped


def test_summary_numbers_by_hand():
    T = tokenview.Token
    shown = [tokenview.Shown("a", "q0", "", 2.0, [T(" x", 3.0, "word"), T("x", 1.0, "word"), T("1", 2.0, "number"),
                                                  T("x", 1.0, "word"), T(" y", 1.0, "word")]),
             tokenview.Shown("b", "q0", "", 1.5, [T("y", 0.5, "word")] * 9 + [T("1", 0.5, "number")])]
    stats = tokenview.summarize_sources(shown)
    assert stats["a"]["classes"] == {"word": [4, 6.0], "number": [1, 2.0]}
    assert tokenview.reference_source(stats) == "b"
    rows, total = tokenview.contrast(stats, "a", "b")
    # "x": 3 of a's 5 tokens (600 per 1000), absent from b: 5.0 of a's 8.0 NLL. "1": 200 per 1000 in
    # a vs 100 in b, only 2x rarer; "y": 200 vs 900, more common in b
    assert rows == [{"token": "x", "count": 3, "nll_share": 5 / 8, "mean_nll": 5 / 3, "per_1000": 600.0,
                     "per_1000_reference": 0.0}]
    assert total == 5 / 8
    text = tokenview.summary_text(stats)
    assert "tokens at least 4x rarer in b's responses carry 62.5% of a's NLL" in text


def test_cli_show_and_html(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "sources")
    page, out = tmp_path / "v.html", tmp_path / "p.json"
    perplexity.main(["--model", str(tiny_model_dir), "--source", "human", "--n", "3", "--show", "1",
                     "--html", str(page), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "=== question 1" in printed and "=== where the NLL sits" in printed
    assert "<!DOCTYPE html>" in page.read_text()
    (r,) = json.loads(out.read_text())
    for e in r["per_example"]:  # what --out reports, against the per-token values it holds
        assert math.exp(sum(e["token_nlls"]) / len(e["token_nlls"])) == pytest.approx(e["ppl"], rel=1e-5)
    assert f"--- human: perplexity {r['per_example'][0]['ppl']:.3f}" in printed
    for argv, needle in [(["--show", "0"], "--show must be at least 1"),
                         (["--html", str(tmp_path)], "--html " + str(tmp_path) + " is a folder")]:
        with pytest.raises(SystemExit, match=needle):
            perplexity.main(["--model", str(tiny_model_dir), "--source", "human"] + argv)
