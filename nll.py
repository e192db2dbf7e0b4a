"""The core of the paper's familiarity measure: the untuned model's negative log-likelihood of each
response token, given its prompt (paper section 3).

perplexity.py turns these sums into the paper's numbers; sources.py's `familiar` source needs
the same per-example values to pick, per question, the candidate the model finds most probable.
Both import this module, which sits below them (tests/test_imports.py checks the order).

For each example, the prompt and response are rendered with `data.render` (the same ids and loss
mask as training), and the NLL is taken over the masked tokens only: the response and its
end-of-turn token. `example_nlls(..., per_token=True)` also returns each of those tokens' NLL,
the very values the sum is made of (tokenview.py shows them).

Speed: examples are sorted into length buckets (little padding), the vocabulary projection runs
only on the supervised positions (the prompt's logits are never computed), a chunk of positions
at a time (sized per device, see head_chunk_rows), sums stay on the device and each batch
synchronises once, when its per-example sums are copied back. The result does not depend on
batch size or order, up to float rounding (a test checks 1e-5 in fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import Batch, Rendered, collate, length_buckets, render
from fileio import progress_bar


def head_chunk_rows(device: torch.device) -> int:
    """How many positions go through the vocabulary projection + cross entropy at once.

    On a GPU, big chunks (few kernel launches). On a CPU, 128: a chunk's fp32 logits (128 x 49,152
    x 4 B = 25 MB for SmolLM2) stay under glibc's 32 MB mmap threshold and near the cache, where
    the 2,048 of a GPU make 400 MB tensors that every forward and backward first page-faults in
    (measured here: a fresh 216 MB tensor fills at 5 GB/s, a reused one at 25 GB/s). The bf16
    LoRA training step runs ~15% faster with 128 (15 s -> 12.5 s, bench.py's 16 pairs); the result
    is the same up to float rounding (tests/test_fast_paths.py checks chunk sizes 2048 and 5).
    """
    return 128 if device.type == "cpu" else 2048


def response_token_nll(model, batch: Batch, chunk_tokens: int | None = None):
    """NLL of every target token, (N,) float32 in row-major order, and the (B, T-1) bool mask of
    the positions that predict them; both left on the device.

    Only positions whose next token is a target go through the (large) vocabulary projection,
    `chunk_tokens` positions at a time (default: head_chunk_rows).
    """
    ids, tgt = batch.input_ids, batch.target_mask  # (B, T) each
    chunk_tokens = chunk_tokens or head_chunk_rows(ids.device)
    pred_mask = tgt[:, 1:]  # (B, T-1): position t predicts token t+1
    # The padding never goes through the layers (model.Packing): h holds the real positions only,
    # row after row, and `predicts` marks which of them predict a target.
    h = model.hidden_states(ids, lengths=batch.lengths)  # (real tokens, hidden)
    real = torch.arange(ids.shape[1], device=ids.device)[None] < batch.lengths[:, None]  # (B, T)
    predicts = F.pad(pred_mask, (0, 1))  # (B, T): position t predicts a target
    hs = h[predicts[real]]  # (N, hidden), in the same row-major order as pred_mask
    labels = ids[:, 1:][pred_mask]  # (N,)
    return token_nlls(model, hs, labels, chunk_tokens), pred_mask


def response_nll(model, batch: Batch, chunk_tokens: int | None = None):
    """Summed NLL and target count per row: (B,) float32 and (B,) long, left on the device."""
    nll, where = response_token_nll(model, batch, chunk_tokens)
    return row_sums(nll, where), where.sum(1)


def token_nlls(model, hs, labels, chunk_tokens: int):
    """-log p(label) (N,) fp32 from the predicting hidden states hs (N, hidden); the vocabulary
    projection runs `chunk_tokens` positions at a time."""
    return torch.cat([
        F.cross_entropy(model.lm_head(hs[i:i + chunk_tokens]).float(), labels[i:i + chunk_tokens],
                        reduction="none")
        for i in range(0, hs.shape[0], chunk_tokens)
    ]) if hs.shape[0] else hs.new_zeros(0, dtype=torch.float32)  # (N,)


def row_sums(nll, where):
    """Per-token values nll (N,), in row-major order of the True entries of `where` (B, T), summed
    per row: (B,) fp32."""
    rows = torch.arange(where.shape[0], device=where.device)[:, None].expand_as(where)[where]  # (N,)
    return torch.zeros(where.shape[0], device=where.device, dtype=torch.float32).index_add_(0, rows, nll)


def row_nll_sums(model, hs, labels, where, chunk_tokens: int):
    """Summed -log p(label) per row (B,) fp32. `where` (B, T) bool marks the scored positions;
    hs (N, hidden) and labels (N,) are those positions' predicting hidden states and tokens, in
    row-major order."""
    return row_sums(token_nlls(model, hs, labels, chunk_tokens), where)


@dataclass
class ExampleNLL:
    index: int
    tokens: int
    nll: float  # summed over the response tokens
    token_nlls: list[float] | None = None  # per target token, in order (example_nlls(per_token=True))

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)


@torch.no_grad()
def example_nlls(model, rendered: list[Rendered], pad_id: int, batch_size: int = 16,
                 max_tokens: int | None = 16384, progress: bool = False,
                 per_token: bool = False) -> list[ExampleNLL]:
    """NLL of each rendered example, in input order; with `per_token`, also the NLL of each of its
    target tokens (the same tensor the sum is taken from, copied back in the same sync)."""
    device = model.device
    batches = length_buckets([len(r.ids) for r in rendered], batch_size, max_tokens)
    out: list[ExampleNLL] = []
    for idx in progress_bar(batches, "perplexity", "batch", progress):
        batch = collate([rendered[i] for i in idx], pad_id).to(device)
        tok_nll, where = response_token_nll(model, batch)
        nll, n = row_sums(tok_nll, where).tolist(), where.sum(1).tolist()  # the one sync of this batch
        if per_token:
            flat, starts = tok_nll.tolist(), [0]
            for t in n:
                starts.append(starts[-1] + t)
            out.extend(ExampleNLL(i, t, s, flat[a:b]) for i, t, s, a, b in zip(idx, n, nll, starts, starts[1:]))
        else:
            out.extend(ExampleNLL(i, t, s) for i, t, s in zip(idx, n, nll))
    return sorted(out, key=lambda e: e.index)


def render_pairs(tok, pairs: list[tuple[str, str]], context: int):
    """Render the (prompt, response) pairs that can be measured: (kept indices into pairs, their
    renderings, skipped counts). Skipped, never silently NaN: an empty response (nothing to
    measure) and an example longer than the model's context."""
    kept, rendered, skipped = [], [], {"empty_response": 0, "too_long": 0}
    for i, (prompt, response) in enumerate(pairs):
        if not response.strip():
            skipped["empty_response"] += 1
            continue
        r = render(tok, prompt, response)
        if len(r.ids) > context:
            skipped["too_long"] += 1
            continue
        kept.append(i)
        rendered.append(r)
    return kept, rendered, skipped
