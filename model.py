"""A hand-written Llama-family transformer: config, RMSNorm, RoPE, grouped-query attention with a
KV cache, SwiGLU MLP, strict safetensors loading, and batched generation.

It runs every target model the paper and this project use: Llama-2/3 (Llama-3's `rope_scaling`),
Mistral, Qwen2/2.5 (bias on q/k/v) and SmolLM2 (a Llama). Modules are named exactly as HF
transformers names them (`model.layers.{i}.self_attn.q_proj.weight`), so an HF checkpoint loads
with strict key matching and no renaming table, and RoPE uses HF's half-split layout.

Deviations from HF transformers, all deliberate:
- One class for all three architectures; the differences are config fields (bias, tied head).
- Attention goes through `scaled_dot_product_attention`; `attn_impl="math"` is the textbook
  softmax(QK^T/sqrt(d))V path that a test uses to check it.
- The linear layers are `Linear`, an nn.Linear whose few-row CPU products (decoding steps) take
  faster routes to the same sums: a copy of a frozen W kept in oneDNN's layout for batched
  decoding steps, W's two halves in a batched product for one fp32 row, W @ x^T for other
  2-64-row fp32 products, oneDNN switched off for 1-2 bf16 rows; same weights, same state-dict
  keys. One sequence decoding on CPU runs its attention as SDPA in fp32.
- Training and scoring drop the right padding before the first layer (`Packing`): the layers run
  on the real tokens only, and attention alone scatters them back onto the (B, T) grid.
- Mistral's sliding window is not implemented: a sequence longer than the window fails loudly
  instead of silently attending too far (every sequence in this project is far shorter).
- Generation is our own small loop (greedy, or temperature + top-p from an explicit seeded
  `torch.Generator`), with left padding so prompts of different lengths batch together. Top-p
  draws among the nucleus's candidates only (HF draws over the whole vocabulary, with zeros
  outside the nucleus): the same distribution, other draws from the same seed.

Run `python model.py --model smollm2-135m-instruct --prompt "What is 7*8?" --chat`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
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
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=q_bias,
            o_proj_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
        )

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


def _memory_bytes() -> int:
    """The machine's physical memory, or a container's limit (cgroup v2) when that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: assume 16 GiB
        total = 16 << 30
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # a number or "max"
        return min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        return total


_onednn_copy_bytes = [0]  # bytes held by all Linears' oneDNN-layout weight copies, this process


def _release_onednn_copy(nbytes: int) -> None:
    _onednn_copy_bytes[0] -= nbytes


class Linear(nn.Linear):
    """nn.Linear with CPU fast paths for products of a few rows (decoding).

    A decoding step multiplies one row per sequence by every weight matrix, so it is bound by how
    fast the weights stream from memory. The kernels torch picks by default on this machine (MKL
    for fp32, oneDNN for bf16, on an AMD EPYC) are slow at exactly that; the same sums in another
    order or by another kernel are faster (tests/test_fast_paths.py compares each with F.linear):
    - decoding steps of 2-64 rows in fp32, 3-64 in bf16 (x of shape (B, 1, in)) with a frozen W
      and no gradient needed: oneDNN's product on a copy of W laid out once in oneDNN's own
      blocked format (`onednn_weight`; the two ops are the ones torch.compile's CPU backend uses
      for frozen weights). F.linear re-lays a bf16 W out on every call, and MKL's fp32 kernel streams W
      poorly at a few rows. A decoding step of 16 rows, SmolLM2-135M: fp32 ~89 -> ~64 ms, bf16
      ~61 -> ~51 ms; 32 rows 138 -> 105 / 92 -> 69 ms (measured back to back). bf16 results
      matched F.linear's bit for bit on this machine, fp32 ones differ by rounding (the tests
      allow rounding in both). The copy costs W's size again in memory, so only decoding steps
      make it: prompts and scoring (several tokens per row; fp32 would gain ~10% there, bf16
      nothing) and batch-1 generation never hold one, and copies stop at
      `onednn_copy_budget_bytes` (a quarter of the machine's or the container's memory; layers
      past it take the paths below). Only frozen weights (requires_grad False: loaded models, LoRA
      bases) get one, since a trained W changes every step, and some writes (a fused optimizer's
      step, `W.data`) do not bump the version the copy is checked against. It is remade when a
      frozen W changes in place (LoRA's merge, load_state_dict) and dropped by .to().
    - fp32, 1 row: W seen as two stacked halves, a batch of two products (2, out/2, in) @
      (2, in, 1). The batched kernel streams W at ~23 GB/s on one core and ~30 GB/s on two, the
      plain vector product at ~11 GB/s (a 113 MB head: 10.3 -> 3.6 ms); fp32 generation at
      batch 1 runs ~1.9x faster (measured back to back, SmolLM2-135M). The oneDNN copy is
      slower than this at one row (a step 27 -> 38 ms).
    - fp32, 2 to 64 rows that do not take the oneDNN copy (a short prompt or scoring, a trained
      W, a gradient needed, or over the budget): the transposed product W @ x^T (fp32 generation
      +16% at batch 16 and +50% at batch 4). Two halves gain nothing here.
    - bf16, 1 or 2 rows: F.linear with oneDNN switched off for the call, so torch's own bf16
      vector kernel runs (fp32 sums, like oneDNN's): ~30 GB/s where oneDNN streams ~15 GB/s and
      pays ~30 us a call; bf16 generation at batch 1 runs ~1.65x faster, at batch 2 +26%.
    Many-row products (prompts, scoring, training) take F.linear: level with the alternatives.
    """

    onednn_copy_rows = {torch.float32: (2, 64), torch.bfloat16: (3, 64)}  # {}: never (tests compare)
    onednn_copy_budget_bytes = _memory_bytes() // 4
    few_rows = (2, 64)  # fp32 rows that take W @ x^T
    one_row_halves = True  # False: one fp32 row takes F.linear (tests compare the two)
    bf16_rows_without_onednn = 2  # 0: bf16 always takes oneDNN (tests compare the two)
    _onednn_copy = None  # (weakref to W, W's version key, copy) once made

    def __getstate__(self):  # copy.deepcopy, pickle, torch.save: oneDNN's copy cannot be copied
        return {**self.__dict__, "_onednn_copy": None}  # and is remade on first use

    def _apply(self, fn, *args, **kwargs):
        # .to() / .float() / .cuda() swap W's storage without bumping its version (the new one
        # may even reuse the old address), so the copy goes here; it also frees its bytes now.
        self._onednn_copy = None
        return super()._apply(fn, *args, **kwargs)

    def takes_onednn_copy(self, x, rows: int) -> bool:
        """Whether this product runs on W's oneDNN copy: a decoding step, (B, 1, in) with B in
        `onednn_copy_rows`, on a frozen W, that needs no gradient (the op has no backward)."""
        lo, hi = self.onednn_copy_rows.get(x.dtype, (1, 0))
        if x.dim() != 3 or x.shape[1] != 1 or not lo <= rows <= hi:  # the cheap tests first
            return False
        W, b = self.weight, self.bias
        if W.requires_grad:  # frozen weights only (see the class docstring)
            return False
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad))
        return (not needs_grad
                and x.dtype == W.dtype  # (F.linear raises on mixed dtypes; so does the copy)
                and not W.is_inference()  # no version counter to tell a stale copy by
                and not torch.is_autocast_enabled("cpu")  # the op does not follow autocast
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)

    def onednn_weight(self):
        """W in oneDNN's layout; made on first use and again after W changed. None when this
        machine's oneDNN has no kernel for W's dtype or the copy would pass the budget."""
        W = self.weight
        key = (W._version, W.data_ptr(), W.dtype, tuple(W.shape))  # in-place writes bump _version
        cached = self._onednn_copy
        if cached is not None and cached[0]() is W and cached[1] == key:
            return cached[2]
        self._onednn_copy = None  # the stale copy goes first: its bytes return to the budget
        if W.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        nbytes = W.numel() * W.element_size()
        if _onednn_copy_bytes[0] + nbytes > self.onednn_copy_budget_bytes:
            return None
        # 16: the row count oneDNN tunes the layout for; 1 to 512 rows all ran as fast with it.
        copy = torch.ops.mkldnn._reorder_linear_weight(W.detach(), 16)
        _onednn_copy_bytes[0] += nbytes  # (not locked: one thread runs the model, see below)
        weakref.finalize(copy, _release_onednn_copy, nbytes)  # freed with the copy
        self._onednn_copy = (weakref.ref(W), key, copy)
        return copy

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        W, b = self.weight, self.bias  # (out, in), (out,) or None
        if x.device.type != "cpu":
            return F.linear(x, W, b)
        if self.takes_onednn_copy(x, rows):
            copy = self.onednn_weight()
            if copy is not None:
                y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), copy, b, "none", [], "")
                return y.reshape(*x.shape[:-1], -1)  # (rows, out) -> (..., out)
        if x.dtype == torch.bfloat16:
            if rows > self.bf16_rows_without_onednn or torch.backends.flags_frozen():
                return F.linear(x, W, b)  # (frozen by disable_global_flags: cannot switch)
            # A process-wide switch, flipped back right after: fine here, where one thread runs
            # the model; another thread's bf16 products in between would also skip oneDNN.
            was = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
            try:
                return F.linear(x, W, b)
            finally:
                torch.backends.mkldnn.enabled = was
        if x.dtype != torch.float32:
            return F.linear(x, W, b)
        if rows == 1 and self.one_row_halves and W.shape[0] % 2 == 0 and W.is_contiguous():
            halves = W.view(2, W.shape[0] // 2, W.shape[1])  # (2, out/2, in), no copy
            # x as the transposed view of a (1, in) row, strides (1, in): with a contiguous
            # (in, 1) column instead, the same product takes a kernel 5x slower (measured).
            column = x.reshape(1, -1).T.expand(2, -1, -1)  # (2, in, 1), no copy
            y = torch.bmm(halves, column)  # (2, out/2, 1): the two halves of W @ x
        elif self.few_rows[0] <= rows <= self.few_rows[1]:
            y = (W @ x.reshape(rows, -1).T).T  # (out, rows) -> (rows, out), a transposed view
        else:
            return F.linear(x, W, b)
        y = y.reshape(*x.shape[:-1], -1)
        return y if b is None else y + b.to(y.dtype)  # (bf16 y under CPU autocast, as F.linear)


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
        self.read_len = 0  # update() returns at least this many positions (see hidden_states)

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
        n = max(end, self.read_len)
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]


def grouped_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(head_dim) + mask) v, written out.

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


class Packing:
    """The real tokens of a right-padded (B, T) batch, one after another: (N, w) <-> (B, T, w).

    Training and scoring batches are right-padded to their longest row; GSM8K rows of one
    micro-batch differ by up to 2x in length, so ~20% of a padded batch is padding. Everything in
    a layer except attention treats tokens one by one, so the layers run on the N real tokens
    alone and only attention, which needs the (B, T) grid, scatters them back into it.
    """

    def __init__(self, real: torch.Tensor):
        self.B, self.T = real.shape  # real: (B, T) bool, True at real tokens
        self.index = real.flatten().nonzero()[:, 0]  # (N,) their flat positions in B * T

    def pad(self, x):
        """(N, w) -> (B, T, w), zeros at the padding."""
        return x.new_zeros(self.B * self.T, x.shape[-1]).index_copy(0, self.index, x).view(self.B, self.T, -1)

    def unpad(self, x):
        """(B, T, w) -> (N, w)."""
        return x.reshape(self.B * self.T, -1).index_select(0, self.index)


def block_causal_attention(q, k, v, block: int = 128):
    """Causal softmax(q k^T / sqrt(head_dim)) v, the queries taken `block` rows at a time.

    q: (B, n_head, T, hd); k, v: (B, n_kv, T, hd) -> (B, n_head, T, hd). Query rows [i0, i1) can
    only see keys [0, i1), so each block multiplies against those keys alone: less work than the
    full T x T product (63% of it at T = 447), and each block's scores (B x n_head x 128 x T at
    most) stay small. The mask is still needed inside the diagonal block.
    The path of bf16 training on CPU, where SDPA's kernel has a slow backward (a bf16 LoRA step
    spent ~30% of its time there): this one is ~25% faster forward + backward at GSM8K lengths and
    the whole step ~6% (measured back to back). In fp32 the step was ~3% slower, and without
    gradients SDPA's forward is as fast, so everything else keeps SDPA.
    """
    B, H, T, hd = q.shape
    n_kv = k.shape[1]
    qg = q.view(B, n_kv, H // n_kv, T, hd)  # query head h uses kv head h // groups (HF's order)
    k, v = k[:, :, None], v[:, :, None]  # (B, n_kv, 1, T, hd): broadcast over the group
    out = []
    for i0 in range(0, T, block):
        i1 = min(T, i0 + block)
        scores = (qg[:, :, :, i0:i1] @ k[..., :i1, :].transpose(-2, -1)) / math.sqrt(hd)  # (B, n_kv, g, i1-i0, i1)
        sees = torch.ones(i1 - i0, i1, dtype=torch.bool, device=q.device).tril(i0)  # query i0+r sees keys <= i0+r
        probs = torch.where(sees, scores.float(), float("-inf")).softmax(-1).to(v.dtype)
        out.append(probs @ v[..., :i1, :])  # (B, n_kv, g, i1-i0, hd)
    return torch.cat(out, dim=3).view(B, H, T, hd)


class Attention(nn.Module):
    cpu_bf16_training_blocks = True  # False: SDPA there too (tests compare the two)
    cpu_one_sequence_sdpa = True  # False: grouped_attention there too (tests compare the two)
    one_sequence_sdpa_max_keys_bf16 = 1024  # beyond, widening the bf16 cache costs more than it saves

    @classmethod
    def uses_one_sequence_sdpa(cls, batch: int, keys: int, dtype: torch.dtype) -> bool:
        """Whether one-token CPU decoding of `batch` rows against `keys` cached positions takes
        SDPA in fp32 (see forward). Transformer.hidden_states asks too: such a step reads exactly
        the filled positions of the cache, no more."""
        return (cls.cpu_one_sequence_sdpa and batch == 1
                and (dtype == torch.float32 or keys <= cls.one_sequence_sdpa_max_keys_bf16))

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = Linear(self.n_head * self.hd, cfg.hidden_size, bias=cfg.o_proj_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, attn_impl: str, packing: Packing | None = None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, width), or (N, width) packed
        if packing is not None:  # back onto the (B, T) grid that attention needs
            q, k, v = packing.pad(q), packing.pad(k), packing.pad(v)
        B, T, _ = q.shape
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, n_head, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, S, hd), S = cached + T
        # Grouped-query attention: each kv head serves n_head / n_kv query heads, without copies.
        if (attn_impl == "sdpa" and self.cpu_bf16_training_blocks and mask is None and cache is None
                and x.device.type == "cpu" and x.dtype == torch.bfloat16 and torch.is_grad_enabled()):
            y = block_causal_attention(q, k, v)  # bf16 training on CPU: see block_causal_attention
        elif attn_impl == "sdpa" and not (T == 1 and x.device.type == "cpu"):
            # mask None = plain causal attention over the whole sequence: the flash path
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_kv != self.n_head)
        elif attn_impl == "sdpa" and self.uses_one_sequence_sdpa(B, k.shape[2], q.dtype):
            # One sequence decoding on CPU: SDPA's fp32 kernel over exactly the cached positions
            # takes ~30 us a layer where two tiny matmuls take ~75 (fp32) or ~125 (bf16, whose
            # small matmuls have a high fixed cost), at ~200 positions. bf16 keys/values are
            # widened to fp32 first, a copy of the layer's cache that grows with its length:
            # level with the bf16 matmuls at ~800 positions, slower beyond (measured at 2,000:
            # 234 vs 197 us), hence the bf16 limit. The output is rounded back to bf16.
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               enable_gqa=self.n_kv != self.n_head).to(q.dtype)
        else:
            # The textbook path. Also used for one-token decoding of a batch on CPU, where it is
            # ~5x faster than SDPA's CPU kernel in bf16 (two small matmuls against the cache).
            y = grouped_attention(q, k, v, mask)  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)  # (B, T, hidden)
        if packing is not None:
            y = packing.unpad(y)  # (N, hidden)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, attn_impl, packing=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, attn_impl, packing)
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
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.attn_impl = "sdpa"  # or "math"
        self.whole_cache_reads_bf16 = True  # False: blocks of 64 in bf16 too (tests compare the two)
        # Activation checkpointing (train.py --grad-checkpoint): when gradients are needed, keep
        # only each layer's input for the backward and run the layer again during it, so that
        # one layer's activations at a time are held instead of all of them (a 7B model's
        # training on a GPU with less memory), for about one more forward pass of compute.
        self.gradient_checkpointing = False

    def hidden_states(self, input_ids, positions=None, mask=None, cache: KVCache | None = None,
                      lengths=None):
        """Final-norm hidden states (B, T, hidden).

        positions: (B, T) rotary positions, default 0..T-1 after whatever the cache holds.
        mask: bool (B, 1, T, S) with True where a query may attend a key; None = causal over the
              sequence, which is exact for right padding (real tokens never look right).
        lengths: (B,) real tokens per right-padded row (training, scoring; no cache or mask): the
              padding is dropped (see Packing) and the result is packed, (N, hidden), the rows'
              real tokens one after another (a batch without padding is just flattened).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if self.cfg.sliding_window is not None and S > self.cfg.sliding_window:
            raise ValueError(f"sequence of {S} tokens exceeds the sliding window "
                             f"{self.cfg.sliding_window}, which this implementation does not apply")
        if positions is None:
            positions = torch.arange(past, S, device=input_ids.device).expand(B, T)
        if mask is None and past > 0:  # decoding against a cache: causal on absolute positions
            mask = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(past)[None, None]
        if cache is not None:
            cache.read_len = 0
            if T == 1 and input_ids.device.type == "cpu":
                # CPU decoding: oneDNN builds, and keeps (~1 MB each), a new bf16 matmul kernel for
                # every new key count, which costs ~2 ms per decoding step and grows memory by
                # 1 MB per token; so the cache is read in blocks of 64 positions, a few shapes.
                # In bf16 it is read whole: a slice of the cache is a strided view that bf16
                # matmuls first copy (30% of a batch-16 decoding step), while the whole cache is
                # contiguous (batch-16 bf16 generation +14%; fp32 matmuls take the slice as it is).
                # The extra, never-written positions are masked out. One sequence reads exactly
                # the S positions when its attention is SDPA in fp32 (see Attention), no oneDNN.
                if self.attn_impl == "sdpa" and Attention.uses_one_sequence_sdpa(B, S, self.dtype):
                    cache.read_len = S
                elif self.dtype == torch.bfloat16 and self.whole_cache_reads_bf16:
                    cache.read_len = cache.max_len
                else:
                    cache.read_len = min(cache.max_len, -(-S // 64) * 64)
                if mask is None:  # a one-token prompt: it sees itself
                    mask = torch.ones(1, 1, 1, S, dtype=torch.bool, device=input_ids.device)
                mask = F.pad(mask, (0, cache.read_len - S), value=False)  # (B|1, 1, 1, read_len)
        packing = None
        if lengths is not None:
            if cache is not None or mask is not None:
                raise ValueError("lengths (packed right-padded rows) cannot be combined with a cache or a mask")
            real = torch.arange(T, device=input_ids.device)[None] < lengths[:, None]  # (B, T)
            if not bool(real.all()):  # with no padding, the grid is already all real tokens
                packing = Packing(real)
                input_ids = input_ids[real]  # (N,)
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden), or (N, hidden) packed
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # on the (B, T) grid
        recompute = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:  # (the default keeps the RNG state, so dropout draws the same masks again)
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, self.attn_impl, packing,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, self.attn_impl, packing)
        if cache is not None:
            cache.length = S
        h = self.model.norm(x)
        return h if lengths is None else h.reshape(-1, h.shape[-1])  # packed: (N, hidden)

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
        """Build from an HF-format folder and load its safetensors weights strictly."""
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


def load_safetensors_folder(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors`, or of the shards a `model.safetensors.index.json` lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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


# ----------------------------------------------------------------------------------------------
# Generation


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

    from pretrained import resolve_model
    from tokenizer import Tokenizer

    try:
        folder = resolve_model(args.model)
        device = args.device or best_device()
        model = Transformer.from_pretrained(folder, args.dtype, device)
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


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ValueError that says why it cannot be used here and what
    to pass instead (instead of torch's assertion deep inside the first .to())."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA GPU(s) (cuda:0..)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: no Apple MPS backend here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps")
    return dev


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


if __name__ == "__main__":
    main()
