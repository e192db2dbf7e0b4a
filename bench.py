"""Side-by-side speed of our code and HF transformers (+ PEFT) on the same work.

Same model folder, same batches of real GSM8K (prompt, answer) pairs (the first training
questions of `tasks.splits("gsm8k")`, rendered by `data.render`), same dtype, same device, one
command. Rows:

  ppl       perplexity forward, tokens/s: the first 32 pairs in length-grouped batches of 16, as
            `nll.example_nlls` batches them. Ours: `nll.response_nll` per batch.
            HF: the same input_ids through `hf(input_ids).logits` + masked cross entropy.
  train     one LoRA optimiser step (q_proj, v_proj, r 8, alpha 16, dropout 0) over 16 pairs in
            length-grouped micro-batches of 8, as train.py accumulates them: forward + backward per
            micro-batch, then AdamW step, zero_grad; tokens/s. Ours: `lora.inject_lora` +
            `train.masked_nll_sum`. HF: `peft.get_peft_model(LoraConfig(...))`, logits + masked
            cross entropy. Both keep the adapters in fp32 (ours always, PEFT by its default
            `autocast_adapter_dtype`). `--grad-checkpoint`: both recompute each layer in the
            backward (ours: train.py's `--grad-checkpoint`; HF: `gradient_checkpointing_enable`).
  gen@B     greedy generation at batch B (default 1 and 16) of N = 200 new tokens (what sources.py
            generates), generated tokens/s. Ours: `generation.generate` with no stop ids; HF:
            `generate(do_sample=False)` with left padding and min_new_tokens = max_new_tokens. Both
            therefore produce exactly B * N tokens; the time includes the prompts' prefill. The
            prefill is why N matters for the batch-16 / batch-1 ratio: it costs the same per prompt
            token at any batch size (compute-bound), while a decode step at batch 16 costs little
            more than at batch 1 (it reads the same weights); at N = 32 the prefill of 16 GSM8K
            prompts (~2,200 tokens) outweighs the 512 generated tokens. After the table, our rows
            are taken apart: the prefill timed alone, the average decoding step that leaves, and
            a step's matrix products timed alone (every Linear on a (B, 1, in) input); and what
            8x batch 1's tokens/s (the performance issue's target) would leave each step.

Timing: `--warmup` untimed iterations, then the median of `--repeats` timed ones, with a device
synchronisation (CUDA) before the clock starts and stops. Each (implementation, dtype, row) runs in
a fresh subprocess, which keeps memory honest and stops one row's allocator state from helping
or hurting the next; the model load is not timed.

Memory (the "mem MB" columns): on CPU, the growth of the process's peak resident set size during
the row (warm-up and repeats), over the resident size just before it with the model loaded: we
return freed heap to the OS (malloc_trim), reset the kernel's peak counter (/proc/self/clear_refs
"5") and read VmHWM after the row; where the reset is not allowed we fall back to ru_maxrss, which
then also holds the loading peak. On CUDA, max_memory_allocated minus memory_allocated before the
row (tensors only, not the caching allocator's reserve). It is activation + optimizer memory, not
the model's weights (printed separately as "model MB"), except that our batched CPU generation
also holds a second copy of the weights in oneDNN's layout (fast.Linear), made in the row.

FLOPs ("model FLOPs": the work the task needs, the same count for both implementations, so the
ratio of achieved FLOP/s equals the ratio of speeds):
  linear(n)     = 2 * P_layers * n, P_layers = every q,k,v,o,gate,up,down weight of all layers
  head(n)       = 2 * hidden * vocab * n, for the n positions whose logits are needed
  attn(T)       = 2 * layers * n_head * head_dim * T * (T + 1)  (causal QK^T and PV, T real tokens)
  decode attn   = 4 * layers * n_head * head_dim * S per new token attending S keys
  ppl           = sum over rows of linear(T_i) + attn(T_i) + head(targets_i)
                  (HF computes the head on every position: that extra work is not counted)
  train (LoRA)  = 2 * (linear + head) [forward + input gradient; frozen weights need no weight
                  gradient] + 3 * attn [forward + dQ, dK, dV] + 3 * LoRA forward (2 r (in+out) per
                  token and adapted module); i.e. about 2x forward, not the 3x of full fine-tuning
  gen           = prefill linear(P_i) + attn(P_i), then N heads, and N-1 decode steps of
                  linear(1) + decode attn per row
Achieved FLOP/s are shown as a percentage of the machine's matrix-product peak, measured here:
the best of a few large square matmuls in the row's dtype.

Random weights (`--random-weights`): the model folder then needs only config.json and the
tokenizer files; bench.py writes seeded random weights of the config's exact shapes (normal, std
0.02, like HF's init) to a temporary folder that both implementations load. Speed does not depend
on the weights' values, so this measures the same work on a machine the real weights cannot reach
(the lent GPU machine takes at most 64 MiB of files). Outputs (perplexities, generated tokens) are
then meaningless, and the agreement lines only show that both sides computed the same function.

Run: python bench.py                       (SmolLM2-135M, fp32 and bf16, CPU)
     python bench.py --quick               (a tiny smoke run, ~2 minutes on 2 cores)
     python bench.py --model qwen2.5-coder-0.5b-instruct --device cuda --out bench.json
     ILB_PLAIN=1 python bench.py               (our plain model, without fast.py's paths)

This is a development tool: it imports transformers and peft (requirements-dev.txt); the product
code never does.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

import fast
import tasks
from data import collate, length_buckets, render, render_prompt
from fileio import check_output_file, write_json_atomic
from generation import generate, prefill
from lora import inject_lora
from model import KVCache, ModelConfig, Transformer
from nll import response_nll
from pretrained import resolve_model
from tokenizer import Tokenizer
from train import masked_nll_sum

ROOT = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROW_NAMES = {"ppl": "perplexity forward", "train": "LoRA train step"}


def row_title(row: str) -> str:
    return ROW_NAMES.get(row) or f"greedy gen batch {row.split('@')[1]}"


# ----------------------------------------------------------------------------------------------
# Machine, timing, memory


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "device": device}
    for pkg in ("transformers", "peft"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_it(fn, warmup: int, repeats: int, device: str) -> list[float]:
    """Seconds of each timed call of fn(), after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(dtype: torch.dtype, device: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` (n x n) @ (n x n) products in `dtype`."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    best = min(time_it(lambda: a @ b, warmup=1, repeats=repeats, device=device))
    return 2 * n ** 3 / best


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory growth (bytes) over a block of work; see the file docstring for what it is."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated - memory_allocated before"
            return self
        try:  # give freed heap back, so that reusing it does not hide the row's growth
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = (_status_kb("VmRSS") or 0) * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM - VmRSS before (peak reset via clear_refs)"
            self.hwm = True
        except OSError:
            self.method = "ru_maxrss - VmRSS before (includes the loading peak)"
            self.hwm = False
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.hwm and _status_kb("VmHWM") is not None:
            self.peak = _status_kb("VmHWM") * 1024 - self.base
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return False


# ----------------------------------------------------------------------------------------------
# The work: data and FLOP counts


def load_work(folder, n: int):
    """The first n GSM8K training pairs: (tokenizer, rendered chats, prompt ids)."""

    tok = Tokenizer.from_folder(folder)
    examples = tasks.splits("gsm8k")["train"][:n]
    rendered = [render(tok, e.prompt, e.answer) for e in examples]
    prompts = [render_prompt(tok, e.prompt) for e in examples]
    return tok, rendered, prompts


def random_weights_folder(src, dst) -> Path:
    """Copy config + tokenizer files of `src` into `dst` and add seeded random safetensors weights."""

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix == ".json" and not f.name.startswith("model.safetensors"):
            shutil.copy(f, dst / f.name)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_json(src / "config.json"))
    state = {}
    for name, p in model.named_parameters():  # a tied head appears once, as the embedding
        t = torch.randn(p.shape) * 0.02 if p.dim() > 1 else torch.ones(p.shape)  # norms: 1
        if name.endswith(".bias"):
            t = torch.zeros(p.shape)
        state[name] = t.contiguous()
    save_file(state, dst / "model.safetensors", metadata={"format": "pt", "source": "bench.py random"})
    return dst


def work_batches(rendered, n: int, batch_size: int, pad_id: int) -> list:
    """The first n pairs in batches of similar length, as nll.example_nlls and train.py's
    micro-batches group them (data.length_buckets), so padding is as small as the product makes it."""
    items = rendered[:n]
    return [collate([items[i] for i in idx], pad_id)
            for idx in length_buckets([len(r.ids) for r in items], batch_size)]


def read_shape(folder) -> dict:
    cfg = ModelConfig.from_json(Path(folder) / "config.json")
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = d * cfg.num_attention_heads * hd + 2 * d * cfg.num_key_value_heads * hd \
        + cfg.num_attention_heads * hd * d + 3 * d * cfg.intermediate_size
    return {"layers": cfg.num_hidden_layers, "hidden": d, "vocab": cfg.vocab_size,
            "attn_width": cfg.num_attention_heads * hd, "kv_width": cfg.num_key_value_heads * hd,
            "layer_params": per_layer * cfg.num_hidden_layers}


def forward_flops(s: dict, lengths: list[int], head_positions: int) -> tuple[float, float]:
    """(linear + head, attention) FLOPs of one causal forward over rows of `lengths`."""
    linear = 2 * s["layer_params"] * sum(lengths) + 2 * s["hidden"] * s["vocab"] * head_positions
    attn = sum(2 * s["layers"] * s["attn_width"] * T * (T + 1) for T in lengths)
    return linear, attn


def row_flops(row: str, s: dict, lengths: list[int], targets: int, new_tokens: int = 0,
              lora_r: int = 8) -> float:
    if row == "ppl":
        linear, attn = forward_flops(s, lengths, targets)
        return linear + attn
    if row == "train":
        linear, attn = forward_flops(s, lengths, targets)
        # q_proj: hidden -> attn_width, v_proj: hidden -> kv_width, one each per layer
        lora = 2 * lora_r * s["layers"] * (2 * s["hidden"] + s["attn_width"] + s["kv_width"]) * sum(lengths)
        return 2 * linear + 3 * attn + 3 * lora
    # generation: prefill, then N - 1 one-token steps per row, N head projections per row
    linear, attn = forward_flops(s, lengths, 0)
    total = linear + attn + 2 * s["hidden"] * s["vocab"] * new_tokens * len(lengths)
    for P in lengths:
        for j in range(1, new_tokens):
            total += 2 * s["layer_params"] + 4 * s["layers"] * s["attn_width"] * (P + j)
    return total


# ----------------------------------------------------------------------------------------------
# One job: one implementation, one dtype, one row, in this (fresh) process


def optimiser_step(model, nll_sum, spec: dict, rendered, pad_id: int):
    """The training row's work for either implementation: one AdamW step over `train_batch` pairs,
    gradients accumulated over length-grouped micro-batches, each micro-batch's summed NLL
    (`nll_sum(batch)`) divided by the step's token count, as train.py does."""
    micro = [b.to(spec["device"]) for b in work_batches(rendered, spec["train_batch"], spec["micro_batch"], pad_id)]
    n_tok = float(sum(b.target_mask.sum() for b in micro))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        total = 0.0
        for b in micro:
            loss = nll_sum(b) / n_tok
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total
    return step


def job_ours(spec: dict, folder, tok, rendered, prompts) -> tuple:

    device, dtype, row = spec["device"], spec["dtype"], spec["row"]
    model = fast.apply(Transformer.from_pretrained(folder, dtype, device))  # ILB_PLAIN=1: our plain model
    if row == "ppl":
        batches = [b.to(device) for b in work_batches(rendered, spec["ppl_examples"], spec["ppl_batch"], tok.pad_id)]

        @torch.no_grad()
        def step():  # .tolist(): the one sync per batch that example_nlls also makes
            return [x for b in batches for x in response_nll(model, b)[0].tolist()]
        extra = {}
        if device.startswith("cuda"):  # is our attention call eligible for the flash kernel?
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run this call
                    step()
                extra["sdpa_flash"] = True
            except RuntimeError:
                extra["sdpa_flash"] = False
        return model, step, extra
    if row == "train":
        inject_lora(model, ["q_proj", "v_proj"], r=8, alpha=16, dropout=0.0, seed=0)
        model.gradient_checkpointing = spec["grad_checkpoint"]
        model.train()
        step = optimiser_step(model, lambda b: masked_nll_sum(model, b, None), spec, rendered, tok.pad_id)
        return model, step, {}
    B = int(row.split("@")[1])

    def step():
        return generate(model, prompts[:B], spec["new_tokens"], pad_id=tok.pad_id)  # no stop ids
    return model, step, {}


def job_hf(spec: dict, folder, tok, rendered, prompts) -> tuple:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("error: the HF side needs transformers and peft: pip install -r requirements-dev.txt")

    device, dtype, row = spec["device"], DTYPES[spec["dtype"]], spec["row"]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()

    def masked_nll(model, batch):
        logits = model(input_ids=batch.input_ids).logits  # (B, T, V): the head on every position
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.input_ids[:, 1:].flatten(),
                             reduction="none").view(batch.input_ids.shape[0], -1)  # (B, T-1)
        return (ce * batch.target_mask[:, 1:]).sum(1)  # (B,)

    extra = {"attn_implementation": getattr(hf.config, "_attn_implementation", None)}
    if row == "ppl":
        batches = [b.to(device) for b in work_batches(rendered, spec["ppl_examples"], spec["ppl_batch"], tok.pad_id)]

        @torch.no_grad()
        def step():
            return [x for b in batches for x in masked_nll(hf, b).tolist()]
        return hf, step, extra
    if row == "train":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise SystemExit("error: the HF training row needs peft: pip install -r requirements-dev.txt")
        torch.manual_seed(0)
        if spec["grad_checkpoint"]:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                           target_modules=["q_proj", "v_proj"]))
        pm.train()
        extra["lora_dtype"] = str(next(p.dtype for n, p in pm.named_parameters() if "lora_A" in n))
        step = optimiser_step(pm, lambda b: masked_nll(pm, b).sum(), spec, rendered, tok.pad_id)
        return pm, step, extra
    B = int(row.split("@")[1])
    P = max(len(p) for p in prompts[:B])
    ids = torch.full((B, P), tok.pad_id, dtype=torch.long)
    attn = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(prompts[:B]):  # left padding, as ours
        ids[b, P - len(p):] = torch.tensor(p)
        attn[b, P - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    N = spec["new_tokens"]

    @torch.no_grad()
    def step():
        out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=N,
                          min_new_tokens=N, pad_token_id=tok.pad_id, top_p=None, top_k=None,
                          temperature=None)
        return out[:, P:].tolist()
    return hf, step, extra


def run_job(spec: dict) -> dict:
    """Time one row in this process; the result is a JSON-able dict."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    folder = spec["folder"]
    tok, rendered, prompts = load_work(folder, spec["n_examples"])
    build = job_ours if spec["impl"] == "ours" else job_hf
    model, step, extra = build(spec, folder, tok, rendered, prompts)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    device, row = spec["device"], spec["row"]
    first = []  # the first call's output, to cross-check against the other implementation

    def recorded():
        out = step()
        if not first:
            first.append(out)

    # Make every weight resident first: safetensors may leave them as memory-mapped file pages that
    # only count in RSS once read, which would charge the whole model to the row's first pass.
    with torch.no_grad():
        for p in model.parameters():
            p.float().sum().item()
    with PeakMemory(device) as mem:
        times = time_it(recorded, spec["warmup"], spec["repeats"], device)
    output = first[0]
    s = read_shape(folder)
    if row in ("ppl", "train"):
        items = rendered[:spec["ppl_examples" if row == "ppl" else "train_batch"]]
        lengths = [len(r.ids) for r in items]
        targets = sum(sum(r.mask[1:]) for r in items)  # collate never targets token 0
        tokens = sum(lengths)
        flops = row_flops(row, s, lengths, targets)
    else:
        B = int(row.split("@")[1])
        lengths = [len(p) for p in prompts[:B]]
        tokens = B * spec["new_tokens"]
        flops = row_flops(row, s, lengths, 0, spec["new_tokens"])
        if any(len(o) != spec["new_tokens"] for o in output):
            raise RuntimeError(f"{spec['impl']} generated {[len(o) for o in output]} tokens, "
                               f"not {spec['new_tokens']} per row: the work would differ")
    if spec["impl"] == "ours" and row.startswith("gen@"):
        B = int(row.split("@")[1])
        extra = {**extra, **decode_breakdown(model, prompts[:B], spec["new_tokens"], tok.pad_id,
                                             spec["repeats"], device)}
    med = statistics.median(times)
    return {**{k: spec[k] for k in ("impl", "dtype", "row")}, "times_s": times, "median_s": med,
            "tokens": tokens, "tokens_per_s": tokens / med, "flops": flops, "flops_per_s": flops / med,
            "peak_mem_bytes": mem.peak, "mem_method": mem.method, "model_bytes": model_bytes,
            "threads": torch.get_num_threads(), "output": output, **extra}


@torch.no_grad()
def decode_breakdown(model, prompts: list[list[int]], new_tokens: int, pad_id: int, repeats: int,
                     device: str) -> dict:
    """Where our generation row's time goes, measured apart from the row: the prompts' prefill
    alone (as `generation.generate` runs it), and one decoding step's matrix products alone (every
    Linear of the model, head included, on a (B, 1, in) input: the kernels a step of B rows
    takes). The rest of a step is attention over the cache and the small ops between products."""

    B, P = len(prompts), max(len(p) for p in prompts)

    def run_prefill():
        prefill(model, prompts, KVCache(model.cfg, B, P + new_tokens, model.device, model.dtype), pad_id)

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(B, 1, m.in_features, generator=g).to(model.device, model.dtype) for m in linears]

    def run_products():
        for m, x in zip(linears, inputs):
            m(x)
    return {"prefill_s": statistics.median(time_it(run_prefill, 1, repeats, device)),
            "products_per_step_s": statistics.median(time_it(run_products, 2, max(repeats, 5), device))}


def step_budget(batch1_tokens_per_s: float, B: int, new_tokens: int, prefill_s: float,
                target: float) -> tuple[float, float]:
    """For batch-B generation at `target` times batch 1's tokens/s: the longest the whole row may
    take (B * new_tokens tokens), and what that leaves each of its new_tokens - 1 decoding steps
    after the prefill (the first new token comes from the prefill's last position)."""
    row_s = B * new_tokens / (target * batch1_tokens_per_s)
    return row_s, (row_s - prefill_s) / max(new_tokens - 1, 1)


def run_job_subprocess(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        spec_path, out_path = Path(d) / "spec.json", Path(d) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result": str(out_path)}))
        proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--worker", str(spec_path)],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            sys.exit(f"error: the {spec['impl']} {spec['dtype']} {spec['row']} run failed: {tail}")
        return json.loads(out_path.read_text())


def worker_main(spec_path: str):
    spec = json.loads(Path(spec_path).read_text())
    result = run_job(spec)
    write_json_atomic(spec["result"], result)


# ----------------------------------------------------------------------------------------------
# Comparing and printing


def agreement(row: str, ours, hf) -> dict:
    """How closely the two implementations' outputs agree: evidence that they did the same work."""
    if row == "ppl":
        rel = max(abs(a - b) / abs(b) for a, b in zip(ours, hf))
        return {"max_rel_diff_nll_per_row": rel}
    if row == "train":
        return {"first_step_loss_ours": ours, "first_step_loss_hf": hf}  # B = 0: the base model's loss
    same = sum(a == b for o, h in zip(ours, hf) for a, b in zip(o, h))
    prefix = [next((i for i, (a, b) in enumerate(zip(o, h)) if a != b), len(o)) for o, h in zip(ours, hf)]
    return {"same_token_fraction": same / sum(len(o) for o in ours), "min_common_prefix": min(prefix)}


def fmt_rate(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def format_table(results: list[dict], peaks: dict) -> str:
    by = {(r["impl"], r["dtype"], r["row"]): r for r in results}
    rows = list(dict.fromkeys(r["row"] for r in results))
    dtypes = list(dict.fromkeys(r["dtype"] for r in results))
    head = (f"{'row':<22} {'dtype':<5} {'ours tok/s':>11} {'HF tok/s':>10} {'ours/HF':>8} "
            f"{'ours %pk':>8} {'HF %pk':>7} {'ours memMB':>10} {'HF memMB':>9}")
    lines = [head, "-" * len(head)]
    for row in rows:
        for dt in dtypes:
            o, h = by.get(("ours", dt, row)), by.get(("hf", dt, row))
            if not (o and h):
                continue
            lines.append(
                f"{row_title(row):<22} {dt:<5} {fmt_rate(o['tokens_per_s']):>11} "
                f"{fmt_rate(h['tokens_per_s']):>10} {o['tokens_per_s'] / h['tokens_per_s']:>7.2f}x "
                f"{100 * o['flops_per_s'] / peaks[dt]:>7.1f}% {100 * h['flops_per_s'] / peaks[dt]:>6.1f}% "
                f"{o['peak_mem_bytes'] / 2**20:>10.0f} {h['peak_mem_bytes'] / 2**20:>9.0f}")
    return "\n".join(lines)


def cross_ratios(results: list[dict]) -> dict:
    by = {(r["impl"], r["dtype"], r["row"]): r["tokens_per_s"] for r in results}
    out = {}
    for row in ("ppl", "train"):
        if ("ours", "bf16", row) in by and ("hf", "fp32", row) in by:
            out[f"{row}: bf16-ours / fp32-HF"] = by["ours", "bf16", row] / by["hf", "fp32", row]
    gens = sorted({int(r["row"].split("@")[1]) for r in results if r["row"].startswith("gen@")})
    if len(gens) >= 2:
        lo, hi = gens[0], gens[-1]
        for impl in ("ours", "hf"):
            for dt in ("fp32", "bf16"):
                if (impl, dt, f"gen@{hi}") in by and (impl, dt, f"gen@{lo}") in by:
                    out[f"gen batch{hi}/batch{lo}: {impl} {dt}"] = by[impl, dt, f"gen@{hi}"] / by[impl, dt, f"gen@{lo}"]
    return out


GEN_BATCH_TARGET = 8  # the performance issue's target: batch 16 at least 8x batch 1's tokens/s


def decode_lines(results: list[dict], new_tokens: int) -> list[str]:
    """Our generation rows taken apart (see decode_breakdown), and for the largest batch what
    GEN_BATCH_TARGET times the smallest batch's tokens/s would leave each decoding step."""
    by = {(r["dtype"], int(r["row"].split("@")[1])): r for r in results
          if r["impl"] == "ours" and r["row"].startswith("gen@") and "prefill_s" in r}
    lines = []
    for (dt, B), r in by.items():
        step_s = (r["median_s"] - r["prefill_s"]) / max(new_tokens - 1, 1)
        lines.append(f"ours {dt} gen@{B}: prefill {r['prefill_s']:.2f} s, then {new_tokens - 1} decoding steps of "
                     f"{1e3 * step_s:.1f} ms on average, of which matrix products alone {1e3 * r['products_per_step_s']:.1f} ms")
    for dt in dict.fromkeys(d for d, _ in by):
        batches = sorted(B for d, B in by if d == dt)
        if len(batches) < 2:
            continue
        lo, hi = by[dt, batches[0]], by[dt, batches[-1]]
        row_s, step_s = step_budget(lo["tokens_per_s"], batches[-1], new_tokens, hi["prefill_s"], GEN_BATCH_TARGET)
        left = (f"{1e3 * step_s:.1f} ms per decoding step after its prefill" if step_s > 0
                else "less than its prefill alone takes")
        lines.append(f"ours {dt}: gen@{batches[-1]} at {GEN_BATCH_TARGET}x gen@{batches[0]}'s tokens/s would take "
                     f"{row_s:.2f} s in all (measured {hi['median_s']:.2f} s): {left}, against "
                     f"{1e3 * hi['products_per_step_s']:.1f} ms for a step's products alone")
    return lines


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Speed of our code vs HF transformers + PEFT, side by side.")
    w = ap.add_argument_group("what to run")
    w.add_argument("--model", default="smollm2-135m-instruct",
                   help="short name (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct) or an HF-format folder")
    w.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES),
                   help="dtypes to run; each row compares ours and HF at equal dtype")
    w.add_argument("--rows", nargs="+", default=["ppl", "train", "gen"], choices=["ppl", "train", "gen"],
                   help="which rows to measure (gen runs every --gen-batch size)")
    w.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    w.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    w.add_argument("--quick", action="store_true",
                   help="tiny smoke run: small batches, 4 new tokens, no warm-up, 1 repeat")
    s = ap.add_argument_group("sizes")
    s.add_argument("--ppl-examples", type=int, default=32, help="GSM8K pairs scored per perplexity iteration")
    s.add_argument("--ppl-batch", type=int, default=16, help="pairs per forward, grouped by length (perplexity.py's default)")
    s.add_argument("--train-batch", type=int, default=16, help="GSM8K pairs per optimiser step (train.py's --batch-size)")
    s.add_argument("--micro-batch", type=int, default=8, help="pairs per forward/backward, grouped by length "
                                                              "(train.py's default --micro-batch)")
    s.add_argument("--gen-batch", type=int, nargs="+", default=[1, 16], help="generation batch sizes")
    s.add_argument("--new-tokens", type=int, default=200,
                   help="tokens generated per prompt, forced on both sides (default: sources.py's response length)")
    s.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing")
    s.add_argument("--repeats", type=int, default=3, help="timed iterations; the median is reported")
    s.add_argument("--matmul-n", type=int, default=None,
                   help="side of the square matmul that measures the peak (default 2048 CPU, 8192 CUDA)")
    ap.add_argument("--grad-checkpoint", action="store_true",
                    help="train row: activation checkpointing on both sides (train.py --grad-checkpoint; "
                         "HF's gradient_checkpointing_enable, non-reentrant)")
    ap.add_argument("--random-weights", action="store_true",
                    help="use seeded random weights of the model's shapes (the folder needs only config.json "
                         "and tokenizer files): same speed, for machines the real weights cannot reach")
    ap.add_argument("--out", default=None, help="also write the results as JSON here (atomically)")
    ap.add_argument("--worker", default=None, metavar="SPEC",
                    help="internal: run one job described by this JSON file (bench.py starts these itself)")
    return ap


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.quick:  # smaller defaults; sizes given explicitly on the command line still win
        parser.set_defaults(ppl_examples=2, ppl_batch=2, train_batch=2, micro_batch=1, new_tokens=4, gen_batch=[1, 4], warmup=0, repeats=1)
        args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device; use --device cpu")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        sys.exit(f"error: unsupported --device {args.device!r}: use cpu or cuda")
    if min(args.ppl_examples, args.ppl_batch, args.train_batch, args.micro_batch, min(args.gen_batch),
           args.new_tokens, args.repeats) < 1:
        sys.exit("error: batch sizes, --new-tokens and --repeats must be at least 1")
    if (args.threads is not None and args.threads < 0) or (args.matmul_n is not None and args.matmul_n < 1):
        sys.exit(f"error: --threads must be >= 0 (0 = torch's default) and --matmul-n at least 1; "
                 f"got {args.threads} and {args.matmul_n}")
    if args.out:  # checked now, not after the measurements
        try:
            check_output_file(args.out, "--out")
        except ValueError as e:
            sys.exit(f"error: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    random_dir = None
    try:
        if args.random_weights:
            src = Path(args.model)
            if not (src / "config.json").is_file():
                raise FileNotFoundError(f"--random-weights needs a folder with config.json and tokenizer "
                                        f"files; {src} has no config.json")
            random_dir = tempfile.TemporaryDirectory(prefix="bench-random-")
            folder = str(random_weights_folder(src, random_dir.name))
        else:
            folder = str(resolve_model(args.model))  # convert once here, not in every worker
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")

    info = machine_info(args.device)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    n = args.matmul_n or (8192 if args.device.startswith("cuda") else (512 if args.quick else 2048))
    peaks = {dt: matmul_peak(DTYPES[dt], args.device, n) for dt in args.dtype}
    print("matmul peak: " + ", ".join(f"{dt} {p / 1e9:,.1f} GFLOP/s" for dt, p in peaks.items())
          + f" (n={n}, best of 5)", flush=True)

    rows = [r for r in args.rows if r != "gen"] + ([f"gen@{b}" for b in args.gen_batch] if "gen" in args.rows else [])
    base = {"model": args.model, "folder": folder, "random_weights": args.random_weights, "device": args.device, "threads": args.threads,
            "n_examples": max(args.ppl_examples, args.train_batch, max(args.gen_batch)),
            "ppl_examples": args.ppl_examples, "ppl_batch": args.ppl_batch,
            "train_batch": args.train_batch, "micro_batch": args.micro_batch,
            "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
            "grad_checkpoint": args.grad_checkpoint}
    results, checks = [], {}
    for row in rows:
        for dt in args.dtype:
            pair = {}
            for impl in ("ours", "hf"):
                t0 = time.time()
                r = run_job_subprocess({**base, "impl": impl, "dtype": dt, "row": row})
                print(f"  {impl:<4} {dt} {row:<7} {fmt_rate(r['tokens_per_s']):>9} tok/s "
                      f"(median of {len(r['times_s'])}; {time.time() - t0:.0f}s with load)",
                      flush=True)
                pair[impl] = r
                results.append(r)
            checks[f"{row} {dt}"] = agreement(row, pair["ours"]["output"], pair["hf"]["output"])

    print()
    print(format_table(results, peaks))
    print()
    mem_method = results[0]["mem_method"] if results else ""
    print("model MB: " + ", ".join(f"{dt} {next(r['model_bytes'] for r in results if r['dtype'] == dt) / 2**20:.0f}"
                                    for dt in args.dtype) + f"; mem = {mem_method}")
    for r in results:
        if "sdpa_flash" in r:
            print(f"ours {r['dtype']} perplexity: attention eligible for SDPA's flash kernel: {r['sdpa_flash']}")
        if r["impl"] == "hf" and r.get("attn_implementation"):
            print(f"HF {r['dtype']} {r['row']}: attn_implementation={r['attn_implementation']}")
            break
    if args.grad_checkpoint and "train" in args.rows:
        print("train with --grad-checkpoint on both sides: %pk counts the step's model FLOPs, not the "
              "recomputed forward passes")
    ratios = cross_ratios(results)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    for line in decode_lines(results, args.new_tokens):
        print(line)
    for k, v in checks.items():
        print(f"agreement {k}: " + ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}"
                                             for a, b in v.items()))
    if args.out:
        for r in results:
            r.pop("output", None)
        payload = {"machine": info, "args": vars(args), "matmul_peak_flops": peaks,
                   "results": results, "ratios": ratios, "agreement": checks}
        write_json_atomic(args.out, payload)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
