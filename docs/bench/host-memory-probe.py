"""Host memory of LoRA training steps on CPU (docs/performance.md, "Host memory").

    OMP_NUM_THREADS=1 python docs/bench/host-memory-probe.py --mode alt --steps 22

SmolLM2-135M (bf16 weights) + LoRA q/v r 8, steps of 8 random token sequences of 150-600 tokens
(two steps in a row see the same lengths). After each step it prints the resident memory
(VmRSS), the step's peak (VmHWM, reset after each step via /proc/self/clear_refs) and the step's
time. --mode none never gives freed memory back; trim does after every step
(devices.release_freed_memory); alt after even steps only, so each odd step runs the lengths of
the step before it right after a trim: the pairs show what a trim costs the next step. Linux only.
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import fast  # noqa: E402
from data import Rendered, collate  # noqa: E402
from devices import release_freed_memory  # noqa: E402
from lora import inject_lora  # noqa: E402
from model import Transformer  # noqa: E402
from nll import response_nll  # noqa: E402
from pretrained import resolve_model  # noqa: E402


def status_mb(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["none", "trim", "alt"], default="alt", help="when to trim (default: alt)")
    ap.add_argument("--steps", type=int, default=22, help="training steps (default: 22)")
    args = ap.parse_args()
    model = fast.apply(Transformer.from_pretrained(resolve_model("smollm2-135m-instruct"), dtype="bf16"))
    inject_lora(model, ["q_proj", "v_proj"], 8, 16, 0.0, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    print("loaded: rss", status_mb("VmRSS"), "MB", flush=True)
    for step in range(args.steps):
        rng = random.Random(step // 2)  # pairs of steps see the same lengths
        rows = []
        for _ in range(8):
            n, prompt = rng.randint(150, 600), rng.randint(60, 140)
            ids = [rng.randint(10, 40000) for _ in range(n)]
            rows.append(Rendered(ids=ids, mask=[0] * prompt + [1] * (n - prompt)))
        batch = collate(rows, 0)
        t0 = time.time()
        nll, count = response_nll(model, batch)
        (nll.sum() / count.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds, peak = time.time() - t0, status_mb("VmHWM")
        trimmed = args.mode == "trim" or (args.mode == "alt" and step % 2 == 0)
        if trimmed:
            release_freed_memory()
        print(f"step {step:2d} ({'trimmed after' if trimmed else 'not trimmed'}): rss {status_mb('VmRSS')} MB, "
              f"peak {peak} MB, {seconds:.2f} s", flush=True)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS


if __name__ == "__main__":
    main()
