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

`show` marks the trained tokens of a rendering; `python sources.py show --task gsm8k --source human
--n 2` prints a training set's examples that way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
# The loss mask, visible (`python sources.py show` prints built examples with it)


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
