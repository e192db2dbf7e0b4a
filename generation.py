"""Batched generation with our model: greedy, or temperature + top-p from an explicit seeded
`torch.Generator`, with a KV cache and left padding so prompts of different lengths batch together.

Deviations from HF transformers' `generate`, all deliberate:
- A prompt's greedy continuation is the same alone or in a batch: each row's rotary positions
  count from its own first real token, and padding is masked out of attention.
- Finished rows leave the batch (the cache keeps only the rows still running).
- On CPU the prompts are prefilled in sorted groups of 4, each padded only to its own longest
  (see `prefill`); a GPU takes them in one call.
- Top-p draws among the nucleus's candidates only (HF draws over the whole vocabulary, with zeros
  outside the nucleus): the same distribution, other draws from the same seed.

`generate_responses` is the one place that turns prompts into replies: through the model's chat
template (data.render_prompt), in length-grouped batches, each sampled from its own seeded
generator; sources.py builds training sets and eval.py answers test questions with it.

Run `python generation.py --model smollm2-135m-instruct --prompt "What is 7*8?" --chat`.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import fast
from data import length_buckets, render_prompt
from devices import best_device
from fileio import progress_bar
from model import DTYPES, KVCache, ModelLoadError, Transformer
from pretrained import resolve_model
from tokenizer import Tokenizer


def draw_index(probs, generator: torch.Generator | None):
    """One index per row of probs (B, n), drawn in proportion to it: (B,) on probs' device.
    multinomial runs on the CPU so a seeded CPU generator gives the same draws on every device."""
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)


def check_sampling(temperature: float, top_p: float) -> None:
    """ValueError, naming the flag, for sampling settings sample_next cannot use."""
    if not 0 <= temperature < math.inf:
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy); got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1]; got {top_p}")


def sample_next(logits, temperature: float, top_p: float, generator: torch.Generator | None):
    """Next token ids (B,) from last-position logits (B, vocab): greedy if temperature == 0."""
    if temperature == 0:
        # bf16 argmax is slow on CPU (1.4 ms for 16 x 49,152 logits, 0.47 ms widened first; the
        # widening is exact, so the same token, ties included)
        return logits.float().argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)  # (B, vocab)
    if top_p >= 1.0:
        return draw_index(probs, generator)
    # Sorting the whole vocabulary is the slow part; the nucleus usually lies in the top 256,
    # so sort those first and fall back to a full sort only if their mass is short of top_p.
    k = min(256, probs.shape[-1])
    top = probs.topk(k, dim=-1)
    full = (top.values.sum(-1) < top_p).any()
    cand_probs, cand_ids = probs.sort(-1, descending=True) if full else top  # (B, k|vocab), largest first
    # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
    drop = cand_probs.cumsum(-1) - cand_probs >= top_p
    cand_probs = cand_probs.masked_fill(drop, 0.0)
    # Draw among the candidates, not the whole vocabulary: CPU multinomial draws one random number
    # per entry, ~16 ms for 16 x 49,152 probabilities (~50 ms at Qwen's 151,936), as long as a GPU
    # decoding step or longer; for 16 x 256, 0.1 ms (after a full sort the candidates are the whole
    # vocabulary again, rarely). The same distribution as multinomial over the whole vocabulary
    # with zeros outside the nucleus, not the same draws. The candidates go in token-id order, so
    # the order topk or sort gave tied probabilities does not change the draw (which of several
    # tied tokens at the nucleus's edge makes the cut still can, as it could before).
    cand_ids, by_id = cand_ids.sort(-1)
    cand_probs = cand_probs.gather(-1, by_id)
    pick = draw_index(cand_probs, generator)  # (B,), a candidate's index
    return cand_ids.gather(-1, pick[:, None]).squeeze(-1)


def left_padded(prompts: list[list[int]], pad_id: int, device):
    """ids (B, P), rotary positions (B, P) and attention mask (B, 1, P, P) of left-padded prompts;
    the mask is None (plain causal) when all prompts have the same length."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, device=device)
    if all(len(p) == P for p in prompts):
        return ids, None, None
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    positions = (torch.arange(P, device=device)[None] - (P - lengths)[:, None]).clamp(min=0)  # (B, P)
    valid = torch.arange(P, device=device)[None] >= (P - lengths)[:, None]  # (B, P): key is real
    mask = torch.ones(P, P, dtype=torch.bool, device=device).tril()[None, None] & valid[:, None, None, :]
    # a left-pad query row would attend to nothing (NaN in softmax): let it see itself
    mask = mask | torch.eye(P, dtype=torch.bool, device=device)[None, None]  # (B, 1, P, P)
    return ids, positions, mask


def prefill(model: Transformer, prompts: list[list[int]], cache: KVCache, pad_id: int = 0,
            group_size: int | None = None):
    """Run the prompts through the model into `cache`, each left-padded to the longest prompt P,
    and return each prompt's last hidden state (B, hidden).

    A GPU takes the whole padded batch in one call: one big call beats many small ones. A CPU is
    compute-bound, so padding is pure waste (16 GSM8K prompts padded to the longest hold 50% more
    tokens); it runs groups of 4 prompts of similar length (sorted), each group padded only to its
    own longest, and copies their keys/values into their slots of the batch cache.
    `group_size` overrides that choice (B = one call).
    """
    B, P = len(prompts), max(len(p) for p in prompts)
    device = model.device
    group_size = group_size or (4 if device.type == "cpu" else B)
    if group_size >= B:
        ids, positions, mask = left_padded(prompts, pad_id, device)
        h = model.hidden_states(ids, positions, mask, cache)  # (B, P, hidden)
        return h[:, -1]
    order = sorted(range(B), key=lambda b: len(prompts[b]))
    last = [None] * B
    for i in range(0, B, group_size):
        rows = order[i:i + group_size]
        group = [prompts[b] for b in rows]
        ids, positions, mask = left_padded(group, pad_id, device)
        group_cache = KVCache(model.cfg, len(rows), ids.shape[1], device, model.dtype)
        h = model.hidden_states(ids, positions, mask, group_cache)[:, -1]  # (rows, hidden)
        for j, b in enumerate(rows):
            cache.put_row(b, P, group_cache, j)
            last[b] = h[j]
    cache.length = P
    return torch.stack(last)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
             stop_ids: list[int] | None = None, stop_strings: list[str] | None = None,
             decode=None, pad_id: int = 0) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns the new ids of each, stop token excluded.

    Prompts are left-padded into one batch: each row's positions count from its own first real
    token and padding is masked out of attention, so a prompt's greedy continuation is the same
    alone or in a batch. A row stops at a `stop_ids` token, or once `decode(new_ids)` contains a
    stop string (the text is cut there), or after max_new_tokens.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each with at least one token")
    device = model.device
    B, P = len(prompts), max(len(p) for p in prompts)
    stop_ids = set(stop_ids or [])
    valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)  # key is real
    for b, p in enumerate(prompts):
        valid[b, P - len(p):] = True
    cache = KVCache(model.cfg, B, P + max_new_tokens, device, model.dtype)
    # Only the last position's logits are needed: skip the vocabulary projection for the prompt.
    logits = model.lm_head(prefill(model, prompts, cache, pad_id))  # (B, vocab)
    next_pos = torch.tensor([len(p) for p in prompts], device=device)  # each row's next position

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    active = list(range(B))  # batch row -> prompt index; finished rows leave the batch
    for step in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, generator)  # (rows,)
        for b, t in zip(active, tok.tolist()):
            if t in stop_ids:
                done[b] = True
                continue
            out[b].append(t)
            if stop_strings and decode is not None and any(s in decode(out[b]) for s in stop_strings):
                done[b] = True
        keep = [j for j, b in enumerate(active) if not done[b]]
        if not keep or step == max_new_tokens - 1:  # no forward pass for a token never sampled
            break
        if len(keep) < len(active):  # compact: finished rows cost nothing from here on
            rows = torch.tensor(keep, device=device)
            cache.keep_rows(rows)
            valid, next_pos, tok = valid[rows], next_pos[rows], tok[rows]
            active = [active[j] for j in keep]
        S = cache.length + 1
        mask = valid[:, None, None, :S].clone()  # (rows, 1, 1, S): every real key so far
        mask[..., -1] = True
        logits = model(tok[:, None], next_pos[:, None], mask, cache)[:, -1]
        next_pos += 1
    if stop_strings and decode is not None:
        out = [trim_at_stop_string(o, stop_strings, decode) for o in out]
    return out


def trim_at_stop_string(ids: list[int], stop_strings: list[str], decode) -> list[int]:
    """Drop the tokens from the one that completes the earliest stop string onwards."""
    text = decode(ids)
    if not any(s in text for s in stop_strings):
        return ids
    for n in range(1, len(ids) + 1):
        if any(s in decode(ids[:n]) for s in stop_strings):
            return ids[:n - 1]
    return ids


def generate_responses(model, tok: Tokenizer, prompts: list[str], max_new_tokens: int = 256,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 16, system: str | None = None, progress: bool = False,
                       return_finished: bool = False) -> list[str] | tuple[list[str], list[bool]]:
    """The model's reply to each prompt through its chat template, in input order.

    Prompts of similar length share a batch. Sampling draws from one seeded generator per batch
    (seed, batch number), so a given list of prompts always gets the same replies.
    With `return_finished`, also whether each reply ended by itself (its end-of-turn token) rather
    than being cut off at max_new_tokens.
    """
    ids = [render_prompt(tok, p, system) for p in prompts]
    batches = length_buckets([len(x) for x in ids], batch_size)
    out: list[str | None] = [None] * len(prompts)
    finished: list[bool | None] = [None] * len(prompts)
    for k, idx in enumerate(progress_bar(batches, "generate", "batch", progress)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        new = generate(model, [ids[i] for i in idx], max_new_tokens, temperature, top_p, gen,
                       stop_ids=tok.stop_ids, pad_id=tok.pad_id)
        for i, n in zip(idx, new):
            out[i] = tok.decode(n).strip()
            finished[i] = len(n) < max_new_tokens  # generate() leaves the stop token out
    return (out, finished) if return_finished else out


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate a continuation with our Llama-family model.")
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a packaged model's short name (see pretrained.py) or an HF-format folder")
    ap.add_argument("--prompt", required=True, help="the text to continue (or the user turn with --chat)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: the checkpoint's")
    ap.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")
    args = ap.parse_args(argv)
    if not args.prompt:
        sys.exit("error: --prompt is empty; give the text to continue")
    if args.max_new_tokens < 1:
        sys.exit(f"error: --max-new-tokens must be at least 1; got {args.max_new_tokens}")
    if not 0 <= args.seed < 2 ** 63:  # torch.Generator's range (a negative seed would alias a positive one)
        sys.exit(f"error: --seed must be between 0 and 2**63 - 1; got {args.seed}")
    try:
        check_sampling(args.temperature, args.top_p)
    except ValueError as e:
        sys.exit(f"error: {e}")

    try:
        folder = resolve_model(args.model)
        device = args.device or best_device()
        model = fast.apply(Transformer.from_pretrained(folder, args.dtype, device))
        tok = Tokenizer.from_folder(folder)
    except (ModelLoadError, FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    if args.chat:
        ids = tok.encode(tok.render_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True))
    else:
        ids = tok.encode(args.prompt, add_bos=True)
    gen = torch.Generator().manual_seed(args.seed)
    new = generate(model, [ids], args.max_new_tokens, args.temperature, args.top_p, gen,
                   stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
    print(tok.decode(new))


if __name__ == "__main__":
    main()
