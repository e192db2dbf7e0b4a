"""The paper's measure of familiarity: the untuned target model's perplexity on a training set's
responses, conditioned on their prompts (paper section 3).

For each example, the prompt and response are rendered with `data.render` (the same ids and loss
mask as training), and the negative log-likelihood is summed over the masked tokens only: the
response and its end-of-turn token. Then
    per-example perplexity  ppl_i = exp(sum NLL_i / n_i)
    data-set perplexity     mean_i ppl_i              (the paper's number)
    pooled perplexity       exp(sum_i NLL_i / sum_i n_i)  (token-weighted; reported beside it)
and the median of ppl_i. The printed table gives each mean with a bootstrap 95% interval
(stats.py) and each later source minus the first, paired per question (matched by its text).

The per-example sums come from nll.py (sources.py's `familiar` source uses them too, and sits
below this module), which also says how they are made fast. The result does not depend on batch
size or order, up to float rounding (a test checks 1e-5 in fp32).

`--show N` / `--html FILE` show the same per-token NLLs the sums are made of, token by token
(tokenview.py), and which tokens make one source less familiar than another.

Multiple choice (eval.py) scores each option as the reply to one question; `shared_prefix_nlls`
runs the question once for all of its options, with the same sums.

Skipped, never silently NaN: an empty response (nothing to measure) and an example longer than
the model's context; both are counted in the output.

CLI: python perplexity.py --task gsm8k --source human self rewrite --n 64 --out ppl.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

import fast
import sources
import stats
import tasks
import tokenview
from data import Rendered
from devices import best_device
from fileio import DefaultsHelpFormatter, check_at_least_one, check_output_file, write_json_atomic
from model import KVCache, ModelLoadError, Transformer
from nll import ExampleNLL, example_nlls, head_chunk_rows, render_pairs, row_nll_sums
from pretrained import resolve_model
from tokenizer import Tokenizer


@torch.no_grad()
def shared_prefix_nlls(model, rendered: list[Rendered], pad_id: int) -> list[ExampleNLL]:
    """example_nlls for renderings that begin alike, such as one question with each of its
    options as the reply: the same sums, with the common prompt run once instead of once per
    option.

    The prefix is the ids all renderings share, cut before the first target token of any of
    them. It runs once into a KV cache; the cache is copied to one row per rendering, and each
    rendering's remaining tokens (right-padded) run against it. The target at absolute position p
    is predicted from position p - 1's hidden state: for p = the prefix length, that is the
    prefix's last state, the same for every rendering. A CSQA question (~125 prompt tokens, five
    replies of ~5) runs ~150 tokens through the layers instead of ~625, two calls instead of one:
    32 CSQA questions score in ~11 s instead of ~21 s on this 2-core CPU (fp32, the same picks,
    log-probabilities within 3e-5). Equal to example_nlls up to float rounding
    (tests/test_perplexity.py checks 1e-5 in fp32); in bf16 the two round differently (~1%).
    """
    n = len(rendered)
    if n == 0:
        return []
    first_target = min(r.mask.index(1) if 1 in r.mask else len(r.ids) for r in rendered)
    L = 0  # the shared prefix's length
    while L < first_target and all(len(r.ids) > L and r.ids[L] == rendered[0].ids[L] for r in rendered):
        L += 1
    T = max(len(r.ids) for r in rendered) - L  # the longest remainder
    if L == 0 or n == 1 or T == 0:  # nothing shared, or nothing after it: the plain way
        return example_nlls(model, rendered, pad_id, batch_size=n)
    device, dtype = model.device, model.dtype
    prefix = torch.tensor([rendered[0].ids[:L]], device=device)  # (1, L)
    # Not data.collate: it never scores a row's first token, and here that is the first reply token.
    ids = torch.full((n, T), pad_id, dtype=torch.long)  # (n, T) remainders, right-padded
    targets = torch.zeros(n, T, dtype=torch.bool)  # (n, T) True where the token is scored
    for b, r in enumerate(rendered):
        ids[b, :len(r.ids) - L] = torch.tensor(r.ids[L:])
        targets[b, :len(r.mask) - L] = torch.tensor(r.mask[L:], dtype=torch.bool)
    ids, targets = ids.to(device), targets.to(device)

    one = KVCache(model.cfg, 1, L, device, dtype)
    h_prefix = model.hidden_states(prefix, cache=one)[:, -1]  # (1, hidden): predicts position L
    cache = KVCache(model.cfg, n, L + T, device, dtype)
    for b in range(n):
        cache.put_row(b, L, one, 0)
    cache.length = L
    # Right padding needs no mask: the default is causal on absolute positions, and padding
    # comes after every real token.
    h_rest = model.hidden_states(ids, cache=cache)  # (n, T, hidden)
    predictors = torch.cat([h_prefix.expand(n, 1, -1), h_rest[:, :-1]], dim=1)  # (n, T, hidden)
    sums = row_nll_sums(model, predictors[targets], ids[targets], targets, head_chunk_rows(device)).tolist()
    counts = targets.sum(1).tolist()
    return [ExampleNLL(i, t, s) for i, (t, s) in enumerate(zip(counts, sums))]


def summarize(nlls: list[ExampleNLL]) -> dict:
    ppls = [e.ppl for e in nlls]
    tokens = sum(e.tokens for e in nlls)
    return {
        "n": len(nlls),
        "tokens": tokens,
        "mean_ppl": sum(ppls) / len(ppls),
        "pooled_ppl": math.exp(sum(e.nll for e in nlls) / tokens),
        "median_ppl": statistics.median(ppls),
    }


def dataset_perplexity(model, tok, pairs: list[tuple[str, str]], batch_size: int = 16,
                       progress: bool = False, per_token: bool = False) -> dict:
    """Perplexity of the model on (prompt, response) pairs; see the module docstring.

    Returns the summary plus `per_example` (aligned with the kept pairs, with their index into
    `pairs`) and `skipped` counts. With `per_token`, each per_example entry also holds
    `token_ids` and `token_nlls`: the scored tokens and the NLLs its `nll` is the sum of."""
    if not pairs:
        raise ValueError("no examples to measure: the training set is empty")
    kept, rendered, skipped = render_pairs(tok, pairs, model.cfg.max_position_embeddings)
    if not rendered:
        raise ValueError(f"every example was skipped ({skipped}); nothing to measure")
    nlls = example_nlls(model, rendered, tok.pad_id, batch_size, progress=progress, per_token=per_token)
    for e in nlls:
        if not math.isfinite(e.nll):
            raise FloatingPointError(f"non-finite NLL on example {kept[e.index]}; try --dtype fp32")
    result = summarize(nlls)
    result["skipped"] = skipped
    result["per_example"] = [{"index": kept[e.index], "tokens": e.tokens, "nll": e.nll, "ppl": e.ppl}
                             for e in nlls]
    if per_token:
        for entry, e in zip(result["per_example"], nlls):
            r = rendered[e.index]
            # collate never scores position 0; the scored tokens are the rest of the mask's ones
            entry.update(token_ids=[t for t, m in zip(r.ids[1:], r.mask[1:]) if m], token_nlls=e.token_nlls)
    return result


# ----------------------------------------------------------------------------------------------
# CLI


def compare_to_first(results: list[dict]) -> list[dict]:
    """Each source's mean perplexity with its bootstrap 95% interval, and, for every source after
    the first, its paired difference to the first on the questions both answered (matched by
    question text): mean of (source - first) per question [paired bootstrap 95% CI], and on how
    many of them the source's perplexity is the lower. One dict per result, in order."""
    first = {e["question"]: e["ppl"] for e in results[0]["per_example"]}
    rows = []
    for i, r in enumerate(results):
        ppls = [e["ppl"] for e in r["per_example"]]
        row = {"source": r["source"], "ci": stats.bootstrap_mean_ci(ppls)[1:]}
        if i > 0:
            shared = [(e["ppl"], first[e["question"]]) for e in r["per_example"] if e["question"] in first]
            if shared:
                mine, ref = zip(*shared)
                row["vs_first"] = {"n": len(shared), "diff": stats.paired_difference(mine, ref),
                                   "lower": sum(a < b for a, b in shared)}
        rows.append(row)
    return rows


def format_table(results: list[dict], compared: list[dict]) -> str:
    """The printed table, sources in the order given: n, tokens, mean perplexity [95% CI], pooled
    and median perplexity, and each later source minus the first, paired per question
    (`compared`: compare_to_first(results))."""
    w = max([6] + [len(r["source"]) for r in results])
    ref = results[0]["source"]
    lines = [f"{'source':<{w}} {'n':>5} {'tokens':>8} {'mean ppl [95% CI]':>26} {'pooled':>8} {'median':>8}"
             f"   minus {ref}, paired [95% CI] (lower on)"]
    for r, c in zip(results, compared):
        mean = f"{r['mean_ppl']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]"
        line = (f"{r['source']:<{w}} {r['n']:>5} {r['tokens']:>8} {mean:>26} "
                f"{r['pooled_ppl']:>8.3f} {r['median_ppl']:>8.3f}")
        if "vs_first" in c:
            v = c["vs_first"]
            d, lo, hi = v["diff"]
            line += f"   {d:+.3f} [{lo:+.3f}, {hi:+.3f}] ({v['lower']} of {v['n']})"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Perplexity of the untuned model on each source's responses.",
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="short name or HF-format folder")
    ap.add_argument("--task", default="gsm8k", help="task whose training questions are measured")
    ap.add_argument("--source", nargs="+", default=["human"],
                    help=f"response sources ({sources.SOURCES_HELP})")
    ap.add_argument("--n", type=int, default=None, help="first N training questions (default: sources.py's, 32)")
    ap.add_argument("--seed", type=int, default=0, help="split seed (same questions for every source)")
    sources.add_question_args(ap)
    ap.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="compute dtype; bf16 is faster, see the README for its distance from fp32")
    ap.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    ap.add_argument("--out", default=None,
                    help="write the JSON results here, atomically (default: none, print the table only)")
    v = ap.add_argument_group("the per-token view (tokenview.py)")
    v.add_argument("--show", type=int, default=None, metavar="N",
                   help="print the first N questions' responses token by token, coloured by NLL, and a "
                        "summary of which tokens make each source unfamiliar (default: off)")
    v.add_argument("--html", default=None, metavar="FILE",
                   help="write the same view as one self-contained HTML page: the first --show questions "
                        "(2 if --show is not given) side by side, NLL on hover, a histogram per source (default: off)")
    g = ap.add_argument_group("the sources' generation settings (as sources.py; they pick the built set)")
    sources.add_generation_args(g)
    g.add_argument("--gen-dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                   help="dtype the sources were generated in (sources.py --dtype)")
    args = ap.parse_args(argv)
    try:  # bad values and an unusable --out fail now, not after the measurement
        check_at_least_one(n=args.n, batch_size=args.batch_size, show=args.show)
        tasks.check_seed(args.seed)
        sources.default_gen(**sources.generation_overrides(args))
        for path, flag in ((args.out, "--out"), (args.html, "--html")):
            if path:
                check_output_file(path, flag)
        if args.train_questions is not None:  # unmatched questions: now, not after the model loads
            tasks.splits(args.task, n_train=args.n, seed=args.seed, **sources.question_overrides(args))
        folder = resolve_model(args.model)
        tok = Tokenizer.from_folder(folder)
        model = fast.apply(Transformer.from_pretrained(folder, args.dtype, args.device or best_device()))
        results, records_by_source = [], {}
        view = bool(args.show or args.html)
        for name in args.source:
            t0 = time.time()
            records = sources.get_training_set(name, args.model, args.task, n_train=args.n, seed=args.seed,
                                               dtype=args.gen_dtype, **sources.question_overrides(args),
                                               **sources.generation_overrides(args))
            r = dataset_perplexity(model, tok, [(x["prompt"], x["response"]) for x in records],
                                   args.batch_size, progress=True, per_token=view)
            records_by_source[name] = records
            for e in r["per_example"]:
                e["question"] = records[e["index"]]["question"]
            results.append({"source": name, **r, "seconds": round(time.time() - t0, 2)})
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    compared = compare_to_first(results)
    print(format_table(results, compared))
    if view:
        tokenview.report(tok, results, records_by_source, args.show, args.html,
                         f"Token NLL under untuned {args.model}: {args.task}, {', '.join(args.source)}")
    if args.out:
        for r, c in zip(results, compared):
            r["mean_ppl_ci"] = list(c["ci"])
            if "vs_first" in c:
                r["minus_first"] = {"source": args.source[0], "n": c["vs_first"]["n"],
                                    "lower_on": c["vs_first"]["lower"],
                                    **dict(zip(("diff", "ci_low", "ci_high"), c["vs_first"]["diff"]))}
        write_json_atomic(args.out, results)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
