"""data.py: the loss mask covers exactly the response and its end-of-turn token, in every chat
family; batching pads on the right and never trains on padding."""

import pytest

from data import collate, length_buckets, render
from test_tokenizer import FAMILIES
from tokenizer import Tokenizer

RESPONSES = [
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\nFinal Answer: 72",
    "  Café: 3 × 4 = 12   spaces\n\n\nFinal Answer: 12  ",
    "x",
]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("response", RESPONSES)
def test_mask_is_exactly_the_response_and_end_of_turn(family, response, family_folders):
    tok = Tokenizer.from_folder(family_folders[family])
    prompt = "Natalia sold clips to 48 of her friends in April. How many?"
    r = render(tok, prompt, response)
    assert len(r.ids) == len(r.mask)
    masked = [i for i, m in zip(r.ids, r.mask) if m]
    # the trained tokens decode back to the response (templates may strip its outer whitespace)
    assert tok.decode(masked, skip_special_tokens=True).strip() == response.strip()
    # ...end with the end-of-turn token, and form one contiguous run
    assert masked[-1] == tok.eot_id
    first = r.mask.index(1)
    last = len(r.mask) - 1 - r.mask[::-1].index(1)
    assert all(r.mask[first:last + 1])
    # everything before is the prompt: the same ids the model is given at generation time
    # (up to template glue such as the space Llama-2 puts between `[/INST]` and the answer)
    head = tok.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    assert tok.decode(r.ids[:first], skip_special_tokens=False).rstrip() == head.rstrip()
    assert prompt.strip() in tok.decode(r.ids[:first], skip_special_tokens=True)


def test_system_prompt_is_not_trained(family_folders):
    tok = Tokenizer.from_folder(family_folders["smollm2"])
    r = render(tok, "2+2?", "Final Answer: 4", system="Be brief.")
    text = tok.decode([i for i, m in zip(r.ids, r.mask) if not m], skip_special_tokens=True)
    assert "Be brief." in text and "2+2?" in text and "Final Answer" not in text


def test_collate_pads_right_and_never_trains_padding(family_folders):
    tok = Tokenizer.from_folder(family_folders["smollm2"])
    items = [render(tok, "q", RESPONSES[0]), render(tok, "q", "x")]
    b = collate(items, pad_id=tok.pad_id)
    assert b.input_ids.shape == (2, len(items[0].ids))
    short = len(items[1].ids)
    assert (b.input_ids[1, short:] == tok.pad_id).all()
    assert not b.target_mask[1, short:].any()
    assert not b.target_mask[:, 0].any()
    assert b.target_mask[0].sum().item() == items[0].n_targets
    assert b.lengths.tolist() == [len(items[0].ids), short]


def test_length_buckets_cover_each_index_once_and_respect_budget():
    lengths = [5, 100, 7, 60, 61, 3, 99, 100, 2]
    batches = length_buckets(lengths, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in batches)
    # sorted longest first: each batch's lengths are no longer than the previous batch's
    maxes = [max(lengths[i] for i in b) for b in batches]
    assert maxes == sorted(maxes, reverse=True)
    capped = length_buckets(lengths, batch_size=8, max_tokens=200)
    assert all(len(b) * max(lengths[i] for i in b) <= 200 or len(b) == 1 for b in capped)
    assert sorted(i for b in capped for i in b) == list(range(len(lengths)))


def test_show_marks_exactly_the_trained_text(family_folders):
    from data import show
    tok = Tokenizer.from_folder(family_folders["smollm2"])
    r = render(tok, "2+2?", "It is ≈ 4.\nFinal Answer: 4")
    text = show(tok, r)
    assert text.count("⟦") == 1 and text.endswith("⟦It is ≈ 4.\nFinal Answer: 4<|im_end|>⟧\n")
    assert "�" not in text
