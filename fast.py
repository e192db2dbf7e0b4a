"""The speed layer: faster kernels for the sums model.py writes out plainly, on CPU and GPU.

`apply(model)` turns them on for a loaded model, in place: it swaps the class of the model, of its
attention modules and of its nn.Linear layers for the subclasses below, so the weights, their
names (the state-dict keys) and every result up to float rounding stay the model's own. Every
command that runs a model calls it right after `Transformer.from_pretrained`. The one switch:
ILB_PLAIN=1 in the environment makes `apply` do nothing, so only model.py's plain code runs
(slower, easier to audit); `apply(model, False)` turns a model plain again.
tests/test_fast_paths.py checks each path below against the plain one.

What it changes, and why (timings on this project's 2-core AMD EPYC unless said otherwise):
- Attention (`attention`): SDPA instead of the written-out softmax(QK^T/sqrt(d))V: the flash
  kernel on a GPU, a fused kernel on CPU. Then three CPU special cases: bf16 training takes
  `block_causal_attention` (SDPA's CPU backward is slow in bf16); one-token decoding of a batch
  keeps model.grouped_attention (~5x faster than CPU SDPA in bf16); one sequence decoding takes
  SDPA in fp32 over exactly the cached positions.
- Padding-free batches (`Packing`): training and scoring run every layer on the real tokens of
  right-padded rows only; attention alone scatters them back onto the (B, T) grid.
- CPU decoding reads the KV cache in a few fixed widths, the positions past the filled ones masked
  (`decoding_mask`): oneDNN builds a new kernel for every new key count.
- `Linear`: decoding steps multiply a few rows by each weight; other kernels and layouts stream
  the weights faster (see the class).

Private or process-wide APIs it uses (checked on torch 2.13.0), and what happens without them:
- torch.ops.mkldnn._reorder_linear_weight and torch.ops.mkldnn._linear_pointwise: oneDNN's
  product on a weight laid out once in oneDNN's blocked format (the ops torch.compile's CPU
  backend uses for frozen weights). Fallback: F.linear, where oneDNN has no bf16 kernel
  (torch.ops.mkldnn._is_mkldnn_bf16_supported), oneDNN is switched off, or the copies would pass
  ONEDNN_COPY_BUDGET_BYTES.
- Tensor._version: tells that a frozen weight changed in place, so that its oneDNN copy is remade.
  Weights made under inference_mode have none: they take F.linear.
- torch.backends.mkldnn.enabled: switched off around one 1-2 row bf16 product, and back; a
  process-wide flag, fine with one thread running the model. After
  torch.backends.disable_global_flags() (flags_frozen) it stays on and oneDNN's product runs.
- /sys/fs/cgroup/memory.max: a container's memory limit, read once at import for the copy budget.
- Swapping `__class__` on live modules (apply): the subclasses add no parameters or buffers.
The thresholds below were measured on that one machine; each can be changed on its own (the
tests switch paths off one at a time to compare them with the path they replace).
"""

from __future__ import annotations

import math
import os
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import model


def plain_requested() -> bool:
    """ILB_PLAIN=1 (any value but empty or 0) in the environment: run the plain model only."""
    return os.environ.get("ILB_PLAIN", "") not in ("", "0")


def apply(net: nn.Module, on: bool | None = None) -> nn.Module:
    """Turn the fast paths on for `net` (a model.Transformer, or any module holding nn.Linears) in
    place, or off with on=False; on=None: on unless ILB_PLAIN is set. Returns `net`."""
    on = not plain_requested() if on is None else on
    swap = FAST if on else {fast: plain for plain, fast in FAST.items()}
    for module in net.modules():
        if type(module) in swap:
            module.__class__ = swap[type(module)]
        if not on:
            module.__dict__.pop("_onednn_copy", None)  # frees a Linear's oneDNN weight copy
    return net


# ----------------------------------------------------------------------------------------------
# Thresholds, measured on this project's machine (see each use)

# Linear: decoding steps of 2-64 rows (fp32) or 3-64 (bf16) multiply by W's oneDNN copy
ONEDNN_COPY_ROWS = {torch.float32: (2, 64), torch.bfloat16: (3, 64)}
FEW_ROWS = (2, 64)  # fp32 products of these many rows take W @ x^T
# One fp32 row: W as two halves in one batched product. Measured to help on the AMD EPYC (torch's
# CPU capability AVX2: batch-1 fp32 generation ~1.9x faster); on an Intel Xeon with AVX-512 MKL's
# own one-row product is ~3x faster than the halves (a 49152 x 576 head: 2.6 vs 7.8 ms) and batch-1
# fp32 generation ran 14 tok/s with them, 30 without (bench.py, ILB_PLAIN=1 against the default).
# So only where it was measured to help; elsewhere F.linear.
ONE_ROW_HALVES = torch.backends.cpu.get_cpu_capability() == "AVX2"
BF16_ROWS_WITHOUT_ONEDNN = 2  # bf16 products of up to this many rows skip oneDNN
# Attention (see `attention` and `decoding_mask`)
BF16_TRAINING_BLOCKS = True  # bf16 training on CPU takes block_causal_attention
ONE_SEQUENCE_SDPA = True  # one sequence decoding on CPU takes SDPA in fp32 ...
ONE_SEQUENCE_SDPA_MAX_KEYS_BF16 = 1024  # ... in bf16 up to this many keys (then widening costs more)
WHOLE_CACHE_READS_BF16 = True  # batched bf16 CPU decoding reads the whole cache, not blocks of 64


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


ONEDNN_COPY_BUDGET_BYTES = _memory_bytes() // 4  # oneDNN weight copies stop here
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
      `ONEDNN_COPY_BUDGET_BYTES` (a quarter of the machine's or the container's memory; layers
      past it take the paths below). Only frozen weights (requires_grad False: loaded models, LoRA
      bases) get one, since a trained W changes every step, and some writes (a fused optimizer's
      step, `W.data`) do not bump the version the copy is checked against. It is remade when a
      frozen W changes in place (LoRA's merge, load_state_dict) and dropped by .to().
    - fp32, 1 row, on an AVX2 CPU (ONE_ROW_HALVES; see there why only on one): W seen as two
      stacked halves, a batch of two products (2, out/2, in) @ (2, in, 1). The batched kernel
      streams W at ~23 GB/s on one core and ~30 GB/s on two, the plain vector product at
      ~11 GB/s (a 113 MB head: 10.3 -> 3.6 ms); fp32 generation at batch 1 runs ~1.9x faster
      (measured back to back, SmolLM2-135M). The oneDNN copy is slower than this at one row (a
      step 27 -> 38 ms).
    - fp32, 2 to 64 rows that do not take the oneDNN copy (a short prompt or scoring, a trained
      W, a gradient needed, or over the budget): the transposed product W @ x^T (fp32 generation
      +16% at batch 16 and +50% at batch 4). Two halves gain nothing here.
    - bf16, 1 or 2 rows: F.linear with oneDNN switched off for the call, so torch's own bf16
      vector kernel runs (fp32 sums, like oneDNN's): ~30 GB/s where oneDNN streams ~15 GB/s and
      pays ~30 us a call; bf16 generation at batch 1 runs ~1.65x faster, at batch 2 +26%.
    Many-row products (prompts, scoring, training) take F.linear: level with the alternatives.
    """

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
        `ONEDNN_COPY_ROWS`, on a frozen W, that needs no gradient (the op has no backward)."""
        lo, hi = ONEDNN_COPY_ROWS.get(x.dtype, (1, 0))
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
        if _onednn_copy_bytes[0] + nbytes > ONEDNN_COPY_BUDGET_BYTES:
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
            if rows > BF16_ROWS_WITHOUT_ONEDNN or torch.backends.flags_frozen():
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
        if rows == 1 and ONE_ROW_HALVES and W.shape[0] % 2 == 0 and W.is_contiguous():
            halves = W.view(2, W.shape[0] // 2, W.shape[1])  # (2, out/2, in), no copy
            # x as the transposed view of a (1, in) row, strides (1, in): with a contiguous
            # (in, 1) column instead, the same product takes a kernel 5x slower (measured).
            column = x.reshape(1, -1).T.expand(2, -1, -1)  # (2, in, 1), no copy
            y = torch.bmm(halves, column)  # (2, out/2, 1): the two halves of W @ x
        elif FEW_ROWS[0] <= rows <= FEW_ROWS[1]:
            y = (W @ x.reshape(rows, -1).T).T  # (out, rows) -> (rows, out), a transposed view
        else:
            return F.linear(x, W, b)
        y = y.reshape(*x.shape[:-1], -1)
        return y if b is None else y + b.to(y.dtype)  # (bf16 y under CPU autocast, as F.linear)


# ----------------------------------------------------------------------------------------------
# Attention and the model


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



def one_sequence_sdpa(batch: int, keys: int, dtype: torch.dtype) -> bool:
    """Whether one-token CPU decoding of `batch` rows against `keys` positions takes SDPA in fp32
    (see `attention`); such a step reads exactly the filled positions of the cache."""
    return ONE_SEQUENCE_SDPA and batch == 1 and (dtype == torch.float32 or keys <= ONE_SEQUENCE_SDPA_MAX_KEYS_BF16)


def attention(q, k, v, mask, dtype: torch.dtype, cached: bool):
    """model.grouped_attention's result by the fastest kernel for this call; `dtype` is the
    layer input's, `cached` whether keys and values come from a KV cache."""
    cpu = q.device.type == "cpu"
    if (BF16_TRAINING_BLOCKS and mask is None and not cached and cpu and dtype == torch.bfloat16
            and torch.is_grad_enabled()):
        return block_causal_attention(q, k, v)  # bf16 training on CPU: see block_causal_attention
    if not (q.shape[2] == 1 and cpu):
        # mask None = plain causal attention over the whole sequence: the flash path
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=k.shape[1] != q.shape[1])
    if one_sequence_sdpa(q.shape[0], k.shape[2], q.dtype):
        # One sequence decoding on CPU: SDPA's fp32 kernel over exactly the cached positions
        # takes ~30 us a layer where two tiny matmuls take ~75 (fp32) or ~125 (bf16, whose
        # small matmuls have a high fixed cost), at ~200 positions. bf16 keys/values are
        # widened to fp32 first, a copy of the layer's cache that grows with its length:
        # level with the bf16 matmuls at ~800 positions, slower beyond (measured at 2,000:
        # 234 vs 197 us), hence the bf16 limit. The output is rounded back to bf16.
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              enable_gqa=k.shape[1] != q.shape[1]).to(q.dtype)
    # One-token decoding of a batch on CPU: the textbook path is ~5x faster than SDPA's CPU
    # kernel in bf16 (two small matmuls against the cache).
    return model.grouped_attention(q, k, v, mask)


def read_cache(cache: model.KVCache, layer: int, k, v, mask):
    """cache.update, but returning as many positions as `mask` has keys where that is more than
    the filled ones (CPU decoding: see decoding_mask; the extra positions are masked out)."""
    k, v = cache.update(layer, k, v)  # (B, n_kv, S, hd)
    n = mask.shape[-1] if mask is not None else 0
    if n > k.shape[2]:
        k, v = cache.k[layer][:, :, :n], cache.v[layer][:, :, :n]  # (B, n_kv, n, hd)
    return k, v


def decoding_mask(mask, batch: int, S: int, max_len: int, dtype: torch.dtype, device):
    """The mask of a one-token CPU decoding step over S filled positions, widened with False to
    the positions the step reads. oneDNN builds, and keeps (~1 MB each), a new bf16 matmul kernel
    for every new key count, which costs ~2 ms per decoding step and grows memory by 1 MB per
    token; so the cache is read in blocks of 64 positions, a few shapes. In bf16 it is read whole:
    a slice of the cache is a strided view that bf16 matmuls first copy (30% of a batch-16
    decoding step), while the whole cache is contiguous (batch-16 bf16 generation +14%; fp32
    matmuls take the slice as it is). One sequence reads exactly the S positions when its
    attention is SDPA in fp32 (see `attention`), no oneDNN."""
    if one_sequence_sdpa(batch, S, dtype):
        read = S
    elif dtype == torch.bfloat16 and WHOLE_CACHE_READS_BF16:
        read = max_len
    else:
        read = min(max_len, -(-S // 64) * 64)
    if mask is None:  # causal: one new token sees every filled position
        mask = torch.ones(1, 1, 1, S, dtype=torch.bool, device=device)
    return F.pad(mask, (0, read - S), value=False)  # (B|1, 1, 1, read)


class Attention(model.Attention):
    """model.Attention with `attention`'s kernels, padding-free batches and widened cache reads."""

    def forward(self, x, cos, sin, mask, cache):
        packing = mask if isinstance(mask, Packing) else None  # see Transformer.hidden_states
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, width), or (N, width) packed
        if packing is not None:  # back onto the (B, T) grid that attention needs, causal
            q, k, v, mask = packing.pad(q), packing.pad(k), packing.pad(v), None
        B, T, _ = q.shape
        q, k, v = self.split_heads(q, k, v)  # (B, n_head, T, hd), (B, n_kv, T, hd) x2
        q, k = model.apply_rope(q, cos, sin), model.apply_rope(k, cos, sin)
        if cache is not None:
            k, v = read_cache(cache, self.layer_idx, k, v, mask)  # (B, n_kv, S or more, hd)
        y = attention(q, k, v, mask, x.dtype, cache is not None)  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)  # (B, T, hidden)
        if packing is not None:
            y = packing.unpad(y)  # (N, hidden)
        return self.o_proj(y)


class Transformer(model.Transformer):
    """model.Transformer that runs right-padded batches without their padding and widens the
    cache reads of CPU decoding steps."""

    def hidden_states(self, input_ids, positions=None, mask=None, cache=None, lengths=None):
        B, T = input_ids.shape
        if lengths is not None and cache is None and mask is None:
            real = torch.arange(T, device=input_ids.device)[None] < lengths[:, None]  # (B, T)
            if bool(real.all()):  # with no padding, the grid is already all real tokens
                return super().hidden_states(input_ids, positions).reshape(B * T, -1)
            self.check_length(T)
            if positions is None:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
            x = self.model.embed_tokens(input_ids[real])  # (N, hidden): the real tokens only
            cos, sin = model.rope_cos_sin(self.inv_freq, positions, x.dtype)  # on the (B, T) grid
            # the Packing goes where the mask goes: Attention takes it from there
            return self.model.norm(self.run_layers(x, cos, sin, Packing(real), None))  # (N, hidden)
        if cache is not None and T == 1 and input_ids.device.type == "cpu":
            mask = decoding_mask(mask, B, cache.length + 1, cache.max_len, self.dtype, input_ids.device)
        return super().hidden_states(input_ids, positions, mask, cache, lengths)


FAST = {nn.Linear: Linear, model.Attention: Attention, model.Transformer: Transformer}
