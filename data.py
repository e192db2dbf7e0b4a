"""From (prompt, response) pairs to token ids, the loss mask, and padded batches.

This is where the paper's "which tokens are trained on" lives, in one function: `render`.
The prompt goes through the target model's own chat template as the user turn and the response
as the assistant turn; the loss mask is 1 exactly on the tokens of the response and the
end-of-turn token that closes it (`<|im_end|>`, `</s>`, `<|eot_id|>`), 0 on the system prompt,
the user turn, the template's glue and anything after the end-of-turn token. Training
(train.py) and perplexity (perplexity.py) both use it, so the perplexity the paper reports is
measured on exactly the tokens that are trained on.

Tasks, splits and prompts are in tasks.py; the response sources in sources.py.

Deviation from the paper's code: it masks by tokenizing the prompt alone and counting its
tokens; we mask by character span on the tokenization of the whole conversation, which stays
exact when a tokenizer merges across the prompt/response boundary (SentencePiece's leading
space in Llama-2's `[/INST] answer`).

`python data.py show --task gsm8k --source human --n 2` prints examples with the trained
tokens marked.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from fileio import check_at_least_one
from tokenizer import Tokenizer


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 = this token is a training target (response or end-of-turn)

    @property
    def n_targets(self) -> int:
        return sum(self.mask)


def chat_messages(prompt: str, response: str | None = None, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def render_prompt(tok: Tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """The ids a model is given to answer `prompt`: the chat up to the assistant header."""
    return tok.encode(tok.render_chat(chat_messages(prompt, system=system), add_generation_prompt=True))


def render(tok: Tokenizer, prompt: str, response: str, system: str | None = None) -> Rendered:
    """(prompt, response) -> ids of the whole chat and the loss mask over them.

    The supervised character span runs from the first character of the response to the end of
    the end-of-turn token after it; a token is a target when its characters overlap that span.
    """
    head = tok.render_chat(chat_messages(prompt, system=system), add_generation_prompt=True)
    text = tok.render_chat(chat_messages(prompt, response, system=system), add_generation_prompt=False)
    if not text.startswith(head):
        raise ValueError("the chat template renders the prompt differently with and without a reply; "
                         "cannot tell prompt from response")
    # Some templates strip the reply (Llama-2 writes ' ' + content.strip()): locate what is there.
    body = response
    start = text.find(body, len(head))
    if start < 0:
        body = response.strip()
        start = text.find(body, len(head)) if body else -1
    if start < 0:
        raise ValueError("the response does not appear in the rendered chat")
    eot = text.find(tok.eot_token, start + len(body))
    if eot < 0:
        raise ValueError(f"no end-of-turn token {tok.eot_token!r} after the response")
    end = eot + len(tok.eot_token)
    ids, offsets = tok.encode_with_offsets(text)
    mask = [1 if (a < end and b > start) else 0 for a, b in offsets]
    return Rendered(ids, mask)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded with pad_id
    target_mask: torch.Tensor  # (B, T) bool: token t is predicted from position t-1 and trained on
    lengths: torch.Tensor  # (B,) real tokens per row

    def to(self, device):
        return Batch(self.input_ids.to(device, non_blocking=True),
                     self.target_mask.to(device, non_blocking=True), self.lengths.to(device))


def collate(items: list[Rendered], pad_id: int) -> Batch:
    """Right-pad to the longest row. Padding is never a target, so the loss ignores it, and with
    right padding a causal model's real tokens never attend to it."""
    T = max(len(r.ids) for r in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.bool)
    for b, r in enumerate(items):
        ids[b, : len(r.ids)] = torch.tensor(r.ids)
        mask[b, : len(r.mask)] = torch.tensor(r.mask, dtype=torch.bool)
    mask[:, 0] = False  # the first token has nothing to be predicted from
    return Batch(ids, mask, torch.tensor([len(r.ids) for r in items]))


def length_buckets(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (little padding), longest first so a
    memory problem shows at once. Deterministic: ties keep their original order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur = [], []
    for i in order:
        # the batch's padded size is set by its first (longest) member
        too_many = max_tokens is not None and cur and (len(cur) + 1) * lengths[cur[0]] > max_tokens
        if len(cur) == batch_size or too_many:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


# ----------------------------------------------------------------------------------------------
# CLI: show which tokens are trained on


def show(tok: Tokenizer, r: Rendered) -> str:
    """The rendered chat with the trained tokens between ⟦ ⟧. Runs of tokens with the same mask
    are decoded together (one token can hold half of a multi-byte character)."""
    out, run, cur = [], [], None
    for i, m in zip(r.ids + [None], r.mask + [None]):
        if m != cur and run:
            text = tok.decode(run, skip_special_tokens=False)
            out.append(f"⟦{text}⟧" if cur else text)
            run = []
        cur = m
        run.append(i)
    return "".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Inspect rendered training examples and their loss mask.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="print examples with the trained tokens marked ⟦like this⟧")
    s.add_argument("--model", default="smollm2-135m-instruct", help="short name or HF-format folder")
    s.add_argument("--task", default="gsm8k", help="task name (see tasks.py)")
    s.add_argument("--source", default="human",
                   help="response source: human, or any source built by sources.py (reads its cache)")
    s.add_argument("--n", type=int, default=2, help="how many training examples to show")
    s.add_argument("--n-train", type=int, default=None,
                   help="size of the built training set to read (sources.py --n-train; default its default)")
    s.add_argument("--seed", type=int, default=0, help="split seed")
    import sources
    sources.add_question_args(s)
    args = ap.parse_args(argv)

    from pretrained import resolve_model

    try:
        import sources
        import tasks
        check_at_least_one(n=args.n, n_train=args.n_train)
        tasks.check_seed(args.seed)
        tok = Tokenizer.from_folder(resolve_model(args.model))
        if args.task in tasks.TASKS and not tasks.has_train(args.task):
            raise ValueError(f"--task {args.task} has no training split (it is evaluation-only); "
                             f"show one of {', '.join(t for t in tasks.TASKS if tasks.has_train(t))}")
        if args.source == "human":
            pairs = [(e.prompt, e.answer) for e in tasks.splits(
                args.task, seed=args.seed, **sources.question_overrides(args))["train"][: args.n]]
        else:
            pairs = [(r["prompt"], r["response"]) for r in sources.load_cached(
                args.source, args.model, args.task, n_train=args.n_train, seed=args.seed,
                **sources.question_overrides(args))[: args.n]]
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    for k, (prompt, response) in enumerate(pairs):
        r = render(tok, prompt, response)
        print(f"=== example {k}: {len(r.ids)} tokens, {r.n_targets} trained on ===")
        print(show(tok, r))
        print()


if __name__ == "__main__":
    main()
