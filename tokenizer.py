"""Text <-> token ids, and the chat templates of the models this project fine-tunes.

The paper renders every prompt with the target model's own chat template (Section 3: perplexity
is measured on "prompt + response" exactly as the model sees a conversation), so the template has
to be reproduced token for token. HF transformers does that by running the checkpoint's Jinja
template; we do not depend on transformers or jinja2, so this file holds one small hand-written
renderer per template family instead:

| family    | models                              | one turn                                             |
|-----------|-------------------------------------|------------------------------------------------------|
| `chatml`  | SmolLM2, Qwen2, Qwen2.5             | `<|im_start|>user\\n...<|im_end|>\\n`                  |
| `llama2`  | Llama-2-chat                        | `<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n... [/INST] ... </s>` |
| `mistral` | Mistral-7B-Instruct-v0.1/v0.2       | `<s> [INST] ... [/INST] ...</s>`                      |
| `llama3`  | Llama-3-Instruct                    | `<|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>` |

The family, and the few details in which real templates of one family differ (a ChatML model's
default system prompt, a space before Llama-2's `</s>`, the 2023 vs 2024 Mistral v0.2 template),
are read from the checkpoint's own template string, so nothing model-specific is hard-coded here.
`tests/test_tokenizer.py` checks every renderer string- and token-identical to
`transformers.apply_chat_template` on the real template strings.

Tokenization itself is the `tokenizers` library (Rust) reading the checkpoint's `tokenizer.json`:
the same code HF's fast tokenizers run, so ids match HF by construction.

Deviations from HF transformers:
- Only the plain-conversation path of each template: roles system / user / assistant with string
  content. Tool calls, documents and multimodal content fail with a clear error rather than
  rendering something approximate. So do Llama-3.1-style templates (date header, tools) and
  Mistral v0.3 / Qwen3 templates (`[AVAILABLE_TOOLS]`, `<think>`).
- Where HF's template would silently skip a message (a second system message in Llama-2), we
  raise instead.
- Special-token strings inside message text become special tokens, as in HF by default
  (`sanitize_control_tokens=False`); the training data here never contains them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass

from tokenizers import Tokenizer as RustTokenizer

from fileio import DefaultsHelpFormatter

CHAT_FAMILIES = ("chatml", "llama2", "mistral", "llama3")
ROLES = ("system", "user", "assistant")


class TokenizerError(ValueError):
    """A tokenizer folder, template or conversation we cannot handle; the message says why."""


# ----------------------------------------------------------------------------------------------
# Reading the folder


def _token_string(value) -> str | None:
    """tokenizer_config.json writes a special token as "<s>" or, in older files, as an AddedToken
    dict {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def read_chat_template(folder: str, config: dict) -> str | None:
    """The chat template in either dialect: transformers 5 writes `chat_template.jinja`,
    transformers 4 a `chat_template` key in tokenizer_config.json (a string, or a list of named
    templates of which we take "default"). The .jinja file wins, as in transformers."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template or None


# ----------------------------------------------------------------------------------------------
# Recognising the template family


@dataclass
class ChatFormat:
    """What `render_chat` needs to know about a checkpoint's template."""

    family: str                         # chatml | llama2 | mistral | llama3
    default_system: str | None = None   # chatml: system prompt used when the chat has none
    eos_separator: str = ""             # llama2: text between the answer and </s> (" " in Meta's)
    inst_prefix: str = "[INST] "        # mistral: "[INST] " (2023) or " [INST] " (2024 revision)
    answer_prefix: str = ""             # mistral: "" (2023) or " " (2024 revision)
    system_allowed: bool = False        # mistral: the 2024 revision folds a system message in


_JINJA_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "'": "'", '"': '"', "\\": "\\"}


def _unescape(literal: str) -> str:
    """The value of a Jinja string literal's body (Python-style backslash escapes)."""
    return re.sub(r"\\(.)", lambda m: _JINJA_ESCAPES.get(m.group(1), "\\" + m.group(1)), literal)


def _canonical(template: str) -> str:
    """A spelling-insensitive form of a template, for looking for the pieces we expect: one
    quote style, `message['x']` for `message.x`, real newlines for `\\n` escapes, no spaces
    around `+`, and adjacent string literals joined (`'a' + 'b'` -> `'ab'`)."""
    t = template.replace('"', "'").replace("\\n", "\n")
    t = re.sub(r"message\.(\w+)", r"message['\1']", t)
    t = re.sub(r"\s*\+\s*", "+", t)
    return t.replace("'+'", "")


def _chatml_default_system(template: str) -> str | None:
    """The default system prompt a ChatML template inserts when the conversation has none: a single
    string literal `'<|im_start|>system\\n...<|im_end|>\\n'` whose body is pure text. (Qwen2.5's
    tool branch, `'<|im_start|>system\\n' + messages[0]['content']`, does not match: its literal
    ends before <|im_end|>.)"""
    pattern = r"""(['"])<\|im_start\|>system(?:\\n|\n)((?:(?!\1)[^\\]|\\.)*?)<\|im_end\|>(?:\\n|\n)\1"""
    m = re.search(pattern, template)
    return _unescape(m.group(2)) if m else None


def detect_chat_format(template: str) -> ChatFormat:
    """Which renderer reproduces `template`. Raises TokenizerError naming what was not recognised."""
    t = _canonical(template)

    def unsupported(what: str) -> TokenizerError:
        return TokenizerError(f"unsupported chat template: {what} (supported: ChatML, Llama-2, "
                              f"Mistral v0.1/v0.2, Llama-3 plain conversations)")

    if "<|im_start|>" in t:
        for marker in ("<think>", "reasoning_content"):
            if marker in t:
                raise unsupported(f"ChatML template with a reasoning block ({marker})")
        turn = "'<|im_start|>'+message['role']+'\n'+message['content']+'<|im_end|>\n'"
        if turn not in t:
            raise unsupported("ChatML template without the usual "
                              "'<|im_start|>' + role + '\\n' + content + '<|im_end|>\\n' turn")
        if "'<|im_start|>assistant\n'" not in t:
            raise unsupported("ChatML template without an '<|im_start|>assistant\\n' generation prompt")
        return ChatFormat("chatml", default_system=_chatml_default_system(template))

    if "<|start_header_id|>" in t:
        for marker in ("Cutting Knowledge Date", "date_string", "<|python_tag|>"):
            if marker in t:
                raise unsupported(f"Llama-3.1-style template ({marker!r}); only the Llama-3 one is")
        if "<|end_header_id|>\n\n" not in t or "<|eot_id|>" not in t:
            raise unsupported("header template without '<|end_header_id|>\\n\\n' ... '<|eot_id|>'")
        return ChatFormat("llama3")

    if "[INST]" in t and "<<SYS>>" in t:
        # Meta's Llama-2-chat writes ' ' + content.strip() + ' ' + eos_token; some copies drop the
        # second space. Both render the user turn identically.
        sep = " " if re.search(r"content'?\]?\.strip\(\)\+' '\+eos_token", t) else ""
        return ChatFormat("llama2", eos_separator=sep)

    if "[INST]" in t:
        for marker in ("[AVAILABLE_TOOLS]", "[SYSTEM_PROMPT]", "[TOOL_RESULTS]"):
            if marker in t:
                raise unsupported(f"Mistral v0.3+ template ({marker})")
        if "' [INST] " in t:   # 2024 revision of the v0.1/v0.2 template
            return ChatFormat("mistral", inst_prefix=" [INST] ", answer_prefix=" ",
                              system_allowed="system_message" in t)
        if "'[INST] " in t:    # the template the model was released with (Dec 2023)
            return ChatFormat("mistral", inst_prefix="[INST] ", answer_prefix="",
                              system_allowed=False)
        raise unsupported("[INST] template without the v0.1/v0.2 '[INST] ' spacing")

    raise unsupported("none of the markers <|im_start|> (ChatML), [INST] with <<SYS>> (Llama-2), "
                      "[INST] (Mistral), <|start_header_id|> (Llama-3) found in "
                      f"{template[:60]!r}")


# ----------------------------------------------------------------------------------------------
# Renderers: each is the plain-conversation path of its family's Jinja template, spelled out.


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise TokenizerError("render_chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TokenizerError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, "
                                 f"got {m!r:.80}")


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    """Templates without a system turn take an optional leading system message and then demand
    user/assistant/user/... alternation (each raises `Conversation roles must alternate`)."""
    system, rest = (messages[0]["content"], messages[1:]) if messages[0]["role"] == "system" else (None, messages)
    for i, m in enumerate(rest):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise TokenizerError("after the optional system message, roles must alternate "
                                 f"user/assistant/user/...; message {i + (system is not None)} is {m['role']!r}")
    return system, rest


def _render_chatml(fmt: ChatFormat, messages: list[dict], add_generation_prompt: bool) -> str:
    out = []
    if messages[0]["role"] != "system" and fmt.default_system is not None:
        out.append(f"<|im_start|>system\n{fmt.default_system}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _render_llama2(fmt: ChatFormat, messages: list[dict], bos: str, eos: str) -> str:
    # Every user turn opens with BOS; the system prompt lives inside the first [INST] block;
    # content is stripped (the template's `content.strip()`). No generation prompt exists:
    # the model answers right after " [/INST]".
    system, rest = _split_system(messages)
    out = []
    for i, m in enumerate(rest):
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            out.append(f"{bos}[INST] {content.strip()} [/INST]")
        else:
            out.append(f" {content.strip()}{fmt.eos_separator}{eos}")
    return "".join(out)


def _render_mistral(fmt: ChatFormat, messages: list[dict], bos: str, eos: str) -> str:
    # One BOS for the whole conversation; the 2024 revision puts the system prompt in front of the
    # first user message. Content is not stripped. No generation prompt exists.
    system, rest = _split_system(messages)
    if system is not None and not fmt.system_allowed:
        raise TokenizerError("this Mistral template has no system role (HF raises 'Only user and "
                             "assistant roles are supported!'); drop the system message")
    out = [bos]
    for i, m in enumerate(rest):
        if m["role"] == "user":
            content = m["content"] if (i > 0 or system is None) else f"{system}\n\n{m['content']}"
            out.append(f"{fmt.inst_prefix}{content} [/INST]")
        else:
            out.append(f"{fmt.answer_prefix}{m['content']}{eos}")
    return "".join(out)


def _render_llama3(messages: list[dict], add_generation_prompt: bool, bos: str) -> str:
    out = [bos]
    for m in messages:   # `message['content'] | trim`
        out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>")
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """`tokenizers.Tokenizer` plus the special tokens and chat template of one checkpoint folder.

    Attributes: bos_id, eos_id, pad_id (eos when the checkpoint has no pad), eot_token / eot_id
    (the token that ends an assistant turn), stop_ids (eot and eos, deduplicated), chat_family
    (None for a folder without a chat template), add_bos_token (whether the model expects BOS in
    front of plain text)."""

    def __init__(self, tk: RustTokenizer, config: dict, chat_template: str | None, source: str = "?"):
        self.tk = tk
        self.source = source
        self.chat_template = chat_template

        def token_id(name: str) -> tuple[str | None, int | None]:
            s = _token_string(config.get(name))
            if s is None:
                return None, None
            i = tk.token_to_id(s)
            if i is None:
                raise TokenizerError(f"{source}: tokenizer_config.json names {name}={s!r}, "
                                     "which is not in tokenizer.json's vocabulary")
            return s, i

        self.bos_token, self.bos_id = token_id("bos_token")
        self.eos_token, self.eos_id = token_id("eos_token")
        pad_token, pad_id = token_id("pad_token")
        self.pad_token, self.pad_id = (pad_token, pad_id) if pad_id is not None else (self.eos_token, self.eos_id)

        # Whether plain text should start with BOS: tokenizer_config's add_bos_token when it says;
        # otherwise whatever tokenizer.json's post-processor does (Llama-3 adds <|begin_of_text|>
        # there and leaves add_bos_token out).
        if "add_bos_token" in config:
            self.add_bos_token = bool(config["add_bos_token"])
        else:
            probe = tk.encode("a", add_special_tokens=True).ids
            self.add_bos_token = self.bos_id is not None and probe[:1] == [self.bos_id]

        self.chat_format = detect_chat_format(chat_template) if chat_template else None
        self.chat_family = self.chat_format.family if self.chat_format else None
        if self.chat_family in ("llama2", "mistral", "llama3") and (self.bos_token is None or self.eos_token is None):
            raise TokenizerError(f"{source}: a {self.chat_family} chat template needs bos_token and "
                                 "eos_token in tokenizer_config.json")
        eot = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(self.chat_family, self.eos_token)
        self.eot_token = eot
        self.eot_id = tk.token_to_id(eot) if eot is not None else None
        if eot is not None and self.eot_id is None:
            raise TokenizerError(f"{source}: end-of-turn token {eot!r} is not in the vocabulary")
        self.stop_ids = list(dict.fromkeys(i for i in (self.eot_id, self.eos_id) if i is not None))

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        """Read `tokenizer.json`, `tokenizer_config.json` and the chat template from an HF-format
        folder (both the transformers 4 and 5 dialects)."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer.json in {folder}; convert the model first "
                                    "(python pretrained.py) or point at an HF checkpoint folder")
        try:
            tk = RustTokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
            raise ValueError(f"cannot read {path} ({e}); the file is damaged: copy or convert the model "
                             f"again (python pretrained.py)") from None
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = {}
        if os.path.exists(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read {config_path} ({e}); the file is damaged") from None
        return cls(tk, config, read_chat_template(folder, config), source=folder)

    # -- text <-> ids ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids of `text`; special-token strings in it become their ids (HF with
        add_special_tokens=False). add_bos=True prepends BOS only if this model expects one
        (`add_bos_token`); a rendered chat already holds its BOS, so encode it with add_bos=False."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos_token and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per token, its (start, end) character span in `text`, as `tokenizers` reports
        it. Byte-level tokens that split one character share that character's span. Used to build
        loss masks by character span (the response starts at character k)."""
        enc = self.tk.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    # -- chat -----------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The conversation as the checkpoint's chat template renders it (string-identical to
        transformers' `apply_chat_template(..., tokenize=False)`). add_generation_prompt appends
        the assistant header where the template has one (ChatML, Llama-3); [INST] templates have
        none, the answer follows `[/INST]` directly."""
        if self.chat_format is None:
            raise TokenizerError(f"{self.source} has no chat template (not an instruct model?); "
                                 "use plain text or a folder with chat_template.jinja")
        _check_messages(messages)
        fmt = self.chat_format
        if fmt.family == "chatml":
            return _render_chatml(fmt, messages, add_generation_prompt)
        if fmt.family == "llama2":
            return _render_llama2(fmt, messages, self.bos_token, self.eos_token)
        if fmt.family == "mistral":
            return _render_mistral(fmt, messages, self.bos_token, self.eos_token)
        return _render_llama3(messages, add_generation_prompt, self.bos_token)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """Ids of the rendered conversation (transformers' `apply_chat_template(tokenize=True)`)."""
        return self.encode(self.render_chat(messages, add_generation_prompt))


# ----------------------------------------------------------------------------------------------
# CLI: look at what a model sees.


def main(argv=None):
    ap = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter,
                                 description="Render a one-turn chat with a checkpoint's template and show its tokens.")
    ap.add_argument("folder", help="an HF-format folder with tokenizer.json (e.g. one pretrained.py made)")
    ap.add_argument("--user", default="What is 7*8?", help="the user message")
    ap.add_argument("--system", default=None, help="a system message (default: none; a template may add its own)")
    ap.add_argument("--assistant", default=None,
                    help="an assistant answer after the user turn (default: none, the chat ends with the user turn)")
    args = ap.parse_args(argv)
    try:
        tok = Tokenizer.from_folder(args.folder)
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        messages.append({"role": "user", "content": args.user})
        if args.assistant is not None:
            messages.append({"role": "assistant", "content": args.assistant})
        text = tok.render_chat(messages, add_generation_prompt=args.assistant is None)
    except (TokenizerError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    ids = tok.encode(text)
    print(f"family={tok.chat_family} bos={tok.bos_token!r} eos={tok.eos_token!r} "
          f"eot={tok.eot_token!r} stop_ids={tok.stop_ids} add_bos_token={tok.add_bos_token}")
    print(repr(text))
    print(f"{len(ids)} tokens:", [tok.tk.id_to_token(i) for i in ids])


if __name__ == "__main__":
    main()
