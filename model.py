"""A hand-written Llama-family transformer: config, RMSNorm, RoPE, grouped-query attention with a
KV cache, SwiGLU MLP, and strict safetensors loading. Plain PyTorch, readable top to bottom.

It runs every target model the paper and this project use: Llama-2/3 (Llama-3's `rope_scaling`),
Mistral, Qwen2/2.5 (bias on q/k/v) and SmolLM2 (a Llama). Modules are named exactly as HF
transformers names them (`model.layers.{i}.self_attn.q_proj.weight`), so an HF checkpoint loads
with strict key matching and no renaming table, and RoPE uses HF's half-split layout.

This is the model; fast.py is a speed layer on top: `fast.apply(model)`, called where a model is
loaded, swaps in faster kernels for the same sums. With ILB_PLAIN=1 in the environment it does
nothing, and the code below is all that runs.

Deviations from HF transformers, all deliberate:
- One class for all three architectures; the differences are config fields (bias, tied head).
- Attention is written out (`grouped_attention`): the query heads of one group are stacked
  against their shared key/value head instead of copying K and V per head.
- Mistral's sliding window is not implemented: a sequence longer than the window fails loudly
  instead of silently attending too far (every sequence in this project is far shorter).
- Generation lives in generation.py.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file

from devices import usable_device

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A checkpoint or config we cannot load; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    """The fields of an HF `config.json` that the forward pass needs."""

    model_type: str = "llama"  # llama | mistral | qwen2
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # < num_attention_heads means grouped-query attention
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3" | "linear", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (and o for Llama's attention_bias)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"  # the checkpoint's own dtype

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        known = set(SUPPORTED_ARCHITECTURES.values())
        if archs and archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture '{archs[0]}' (supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)})")
        if model_type not in known:
            if archs:
                model_type = SUPPORTED_ARCHITECTURES[archs[0]]
            else:
                raise ModelLoadError(
                    f"unsupported model_type '{model_type}' (supported: {', '.join(sorted(known))})")
        # transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
        rope = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type not in ("llama3", "linear", "default"):
                raise ModelLoadError(
                    f"unsupported rope_scaling type '{rope_type}' (supported: llama3, linear)")
            rope_scaling = None if rope_type == "default" else {**rope_scaling, "rope_type": rope_type}
        if d.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"unsupported hidden_act '{d['hidden_act']}' (supported: silu)")
        eos = d.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if model_type == "qwen2":
            q_bias, o_bias = True, False  # Qwen2 always has q/k/v bias, never o_proj bias
        else:
            q_bias = o_bias = bool(d.get("attention_bias", False))
        sliding = d.get("sliding_window") if d.get("use_sliding_window", model_type == "mistral") else None
        return cls(
            model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0, max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta), rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), attention_bias=q_bias,
            o_proj_bias=o_bias, mlp_bias=bool(d.get("mlp_bias", False)), sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"no config.json at {path}: pass an HF-format model folder")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ModelLoadError(f"{path} is not a JSON object of config fields")
        try:
            cfg = cls.from_dict(d)
        except KeyError as e:
            raise ModelLoadError(f"{path} lacks the required field {e}") from None
        # wrong types would otherwise surface as a TypeError deep inside torch
        for name, kind in (("vocab_size", int), ("hidden_size", int), ("intermediate_size", int),
                           ("num_hidden_layers", int), ("num_attention_heads", int), ("num_key_value_heads", int),
                           ("head_dim", int), ("max_position_embeddings", int), ("rms_norm_eps", (int, float))):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ModelLoadError(f"{path}: {name} must be a number, got {value!r}")
        return cfg


# ----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 like HF (bf16 variance is too coarse), cast back before the scale.
        # (F.rms_norm computes the same in one call, but its backward is slower on CPU.)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for the head_dim/2 rotary pairs, with Llama-3 or linear scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # Llama-3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for integer positions (B, T), computed in fp32 as HF does -> (B, 1, T, head_dim),
    the 1 broadcasting over heads (made once per forward, used by every layer)."""
    freqs = positions[:, None, :, None].float() * inv_freq.float()  # (B, 1, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # half-split layout: pair i is (i, i + head_dim/2)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, n_head, T, head_dim); cos, sin: (B, 1, T, head_dim)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_head, max_len, head_dim) each.

    `length` is how many positions are filled; forward() writes the new ones after it.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len

    def put_row(self, row: int, end: int, other: "KVCache", other_row: int):
        """Copy the filled positions of `other`'s row `other_row` to the positions that end at
        `end` in `row` here. With left padding both ways, a prompt's real positions stay last, and
        the other cache's padding lands on positions that are padding here too (masked out)."""
        n = other.length
        for layer in range(len(self.k)):
            self.k[layer][row, :, end - n:end] = other.k[layer][other_row, :, :n]
            self.v[layer][row, :, end - n:end] = other.v[layer][other_row, :, :n]

    def keep_rows(self, rows: torch.Tensor):
        """Drop finished sequences from the batch: keep only `rows` (1-D index tensor)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def update(self, layer: int, k, v):
        """Store k, v (B, n_kv, T, hd) at [length, length+T) and return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def grouped_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(head_dim) + mask) v, written out: the attention of this model.

    q: (B, n_head, T, hd); k, v: (B, n_kv, S, hd); mask: bool (B|1, 1, T, S), True = may attend,
    or None for causal. Query head h uses kv head h // groups (HF's repeat_interleave order), so
    the heads of one group are stacked as extra rows instead of copying K and V per head.
    """
    B, H, T, hd = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    g = H // n_kv
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    scores = (q.reshape(B, n_kv, g * T, hd) @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, n_kv, g*T, S)
    if T > 1:  # the mask's T query rows, once per stacked head (one decoded token: broadcasts)
        mask = mask[:, :, None].expand(mask.shape[0], 1, g, T, S).reshape(mask.shape[0], 1, g * T, S)
    probs = torch.where(mask, scores.float(), float("-inf")).softmax(-1).to(v.dtype)
    return (probs @ v).reshape(B, H, T, hd)  # (B, n_kv, g*T, hd) -> (B, n_head, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=cfg.o_proj_bias)

    def split_heads(self, q, k, v):
        """(B, T, width) each -> q (B, n_head, T, hd), k and v (B, n_kv, T, hd)."""
        B, T, _ = q.shape
        return (q.view(B, T, self.n_head, self.hd).transpose(1, 2),
                k.view(B, T, self.n_kv, self.hd).transpose(1, 2),
                v.view(B, T, self.n_kv, self.hd).transpose(1, 2))

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.split_heads(self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, S, hd), S = cached + T
        y = grouped_attention(q, k, v, mask)  # (B, n_head, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))  # (B, T, hidden)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, the layers and the final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # Activation checkpointing (train.py --grad-checkpoint): keep only each layer's input for
        # the backward and run the layer again there: one layer's activations held at a time
        # instead of all (a 7B model on a smaller GPU), for about one more forward pass.
        self.gradient_checkpointing = False

    def hidden_states(self, input_ids, positions=None, mask=None, cache: KVCache | None = None,
                      lengths=None):
        """Final-norm hidden states (B, T, hidden).

        positions: (B, T) rotary positions, default 0..T-1 after whatever the cache holds.
        mask: bool (B, 1, T, S) with True where a query may attend a key; None = causal over the
              sequence, which is exact for right padding (real tokens never look right).
        lengths: (B,) real tokens per right-padded row (training, scoring; no cache or mask): the
              result is then the real positions only, (N, hidden), the rows one after another.
        """
        B, T = input_ids.shape
        if lengths is not None and (cache is not None or mask is not None):
            raise ValueError("lengths (packed right-padded rows) cannot be combined with a cache or a mask")
        past = cache.length if cache is not None else 0
        S = past + T
        self.check_length(S)
        if positions is None:
            positions = torch.arange(past, S, device=input_ids.device).expand(B, T)
        if mask is None and past > 0:  # decoding against a cache: causal on absolute positions
            mask = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(past)[None, None]
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # (B, 1, T, head_dim) each
        x = self.run_layers(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length = S
        h = self.model.norm(x)
        if lengths is None:
            return h
        return h[torch.arange(T, device=h.device)[None] < lengths[:, None]]  # (N, hidden)

    def check_length(self, S: int) -> None:
        if self.cfg.sliding_window is not None and S > self.cfg.sliding_window:
            raise ValueError(f"sequence of {S} tokens exceeds the sliding window "
                             f"{self.cfg.sliding_window}, which this implementation does not apply")

    def run_layers(self, x, cos, sin, mask, cache):
        """x through every decoder layer, recomputed in the backward with gradient_checkpointing."""
        recompute = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:  # (the default keeps the RNG state, so dropout draws the same masks again)
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return x

    def forward(self, input_ids, positions=None, mask=None, cache=None):
        """Logits (B, T, vocab)."""
        return self.lm_head(self.hidden_states(input_ids, positions, mask, cache))

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "Transformer":
        """Build from an HF-format folder and load its safetensors weights strictly. The plain
        model: `fast.apply(model)` turns on the fast paths (every command line does)."""
        path = Path(path)
        device = usable_device(device)
        if not path.is_dir():
            raise ModelLoadError(f"model folder {path} does not exist")
        cfg = ModelConfig.from_json(path / "config.json")
        if dtype is None:
            dtype = cfg.torch_dtype
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ModelLoadError(f"unknown dtype '{dtype}' (use fp32, bf16 or fp16)")
            dtype = DTYPES[dtype]
        with torch.device("meta"):
            model = cls(cfg)
        state = load_safetensors_folder(path)
        load_state_dict_strict(model, state, dtype, device)
        return model.eval()


# ----------------------------------------------------------------------------------------------
# Loading


def load_safetensors_folder(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors`, or of the shards a `model.safetensors.index.json` lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ModelLoadError(f"no model.safetensors or model.safetensors.index.json in {path}")
    state = {}
    for shard in shards:
        f = path / shard
        if not f.is_file():
            raise ModelLoadError(f"shard {shard} listed in the index is missing from {path}")
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read {f} (truncated or corrupt?): {e}; copy the model again, or for "
                                 f"a packaged model delete {path} and run again (it is converted anew)") from None
    return state


def load_state_dict_strict(model: nn.Module, state: dict, dtype: torch.dtype, device) -> None:
    """Copy `state` into the (meta) model: every key must exist with the right shape, and no more."""
    expected = dict(model.named_parameters())  # tied weights appear once, under the embedding
    tied = model.cfg.tie_word_embeddings
    state = dict(state)
    if tied:
        # Some tied checkpoints also store lm_head.weight; it must equal the embedding then.
        state.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise ModelLoadError(f"checkpoint is missing tensor '{missing[0]}'"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise ModelLoadError(f"checkpoint has unexpected tensor '{unexpected[0]}'"
                             + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, p in expected.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise ModelLoadError(f"tensor '{name}' has shape {tuple(state[name].shape)}, "
                                 f"the config expects {tuple(p.shape)}")
        if not torch.isfinite(state[name]).all():  # else generation runs on and prints nothing
            raise ModelLoadError(f"tensor '{name}' holds NaN or Inf values; the checkpoint is damaged: "
                                 f"copy the model again")
    for name in expected:  # replace each meta parameter by the loaded tensor (frozen)
        parent_name, _, leaf = name.rpartition(".")
        tensor = state[name].to(device=device, dtype=dtype)
        setattr(model.get_submodule(parent_name), leaf, nn.Parameter(tensor, requires_grad=False))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(model.cfg).to(device)
