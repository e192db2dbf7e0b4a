"""The experiment in one command: `python train.py --source self`.

For each response source (paper section 2) on the same training questions, `run_source`:
  1. builds or reuses the training set (sources.py),
  2. measures the untuned model's perplexity on it (perplexity.py; the paper's familiarity),
  3. LoRA fine-tunes (lora.py; the paper's q_proj,v_proj r=8 alpha=16), validating after every
     epoch on held-out training-split questions and keeping the best epoch's adapter (`fine_tune`),
  4. tests the best adapter on the task's test set and on other tasks (eval.py; forgetting).
Every run writes runs/<name>/: config.json (every argument, git commit, seeds), metrics.jsonl,
adapter/ (the best, in PEFT's format), checkpoint/ (the last epoch, for --resume) and
results.json, and prints a summary. runfolder.py keeps that folder: resuming, checkpoints, the
lock, and the waits of torchrun's other processes.

The training loop, in plain sight:
- loss = sum of NLL over the supervised tokens of an optimiser step / number of those tokens,
  counted across all gradient-accumulation micro-batches and all processes. A long response thus
  weighs by its tokens, as in one big batch, whatever the micro-batching.
- AdamW on the LoRA parameters only; linear warmup then cosine decay; gradient clipping.
- bf16 autocast on CUDA (fp16 + a gradient scaler where bf16 is missing); `--dtype bf16` on CPU.
- `--grad-checkpoint`: each layer is run again in the backward instead of keeping its
  activations (model.Transformer.gradient_checkpointing): same gradients, far less memory.
- Data parallel with `torchrun --nproc_per_node=N train.py ...`: every optimiser step's examples
  are dealt out across processes, each process sums its NLL / the global token count, and the
  LoRA gradients are summed with one all-reduce (no DistributedDataParallel wrapper: the few
  LoRA tensors make the explicit version both simple and exact).

Deviations from the paper: the defaults are a CPU-sized experiment (SmolLM2-135M, a few dozen
examples, few epochs); `--preset paper` restores the paper's setting for a GPU. Validation
uses held-out training questions, never the test set (the paper's code used the head of test).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import fast
import sources
import stats
import tasks
from data import Batch, collate, length_buckets, render
from devices import best_device, release_freed_memory, usable_device
from eval import accuracy_ci, evaluate_task
from fileio import (DefaultsHelpFormatter, check_at_least_one, check_output_folder, exclusive_lock, progress_bar,
                    write_json_atomic)
from lora import LoRAConfig, count_parameters, inject_lora, load_adapter, target_module_names, update_ratios
from model import ModelConfig, ModelLoadError, Transformer
from nll import example_nlls, response_nll
from perplexity import dataset_perplexity
from pretrained import check_model_name, resolve_model
from runfolder import RunFolder, claim, close_process_group, dist_setup, git_commit, leave_together
from tokenizer import Tokenizer

PRESETS = {
    # The paper: 1000 examples, LoRA q/v r8 alpha16, effective batch 30, cosine, lr 5e-5..2e-4,
    # up to 10-20 epochs with the best checkpoint on validation.
    "paper": dict(n_train=1000, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_targets="q_proj,v_proj",
                  batch_size=30, lr=2e-4, epochs=10, warmup_ratio=0.03, n_val=100, n_test=None,
                  max_new_tokens=512, dtype="bf16", eval_batch_size=16),
}

# ----------------------------------------------------------------------------------------------
# One source, end to end: the paper's steps


@dataclass
class Context:
    model_folder: Path
    tok: object
    rank: int
    world: int
    device: str
    base: dict | None = None  # the untuned model's test results (rank 0)
    base_dir: str | None = None  # where its per-example answers are (for paired comparisons)


def run_source(source: str, args, ctx: Context) -> dict:
    """Steps 1-4 for one response source; its results (rank 0; {} on torchrun's other ranks)."""
    rank, tok = ctx.rank, ctx.tok
    run = RunFolder(source, args, rank, ctx.world)
    if args.resume and not run.resuming:
        run.say(f"--resume: {run.path} has no finished epoch to continue; starting the run from the beginning")

    # 1. the training set: rank 0 builds it (or finds it cached), then the other ranks read the cache
    def build(name, **split):
        return sources.build(name, args.model, args.task, args.n_train, args.seed, dtype=args.gen_dtype,
                             device=args.device, progress=rank == 0, **split, **sources.question_overrides(args),
                             **sources.generation_overrides(args))
    with run.rank_zero_first():
        records, manifest = build(source)
        # the same source's answers to the validation questions: the validation loss is measured on
        # what this source would have taught there (a file: source answers them from its file)
        val_records, val_manifest = build(source, split="val", n_val=args.n_val)
    run.say(f"training set: {manifest['kept']} examples, by path {manifest['counts_by_path']}; "
            f"validation answers: {val_manifest['kept']} of {val_manifest['questions']}")

    model = fast.apply(Transformer.from_pretrained(ctx.model_folder, args.dtype, ctx.device))
    model.gradient_checkpointing = args.grad_checkpoint
    pairs = [(r["prompt"], r["response"]) for r in records]
    rendered = [render(tok, p, r) for p, r in pairs]
    keep = [i for i, r in enumerate(rendered) if len(r.ids) <= args.max_seq_len]
    if len(keep) < len(rendered):
        run.say(f"dropping {len(rendered) - len(keep)} examples longer than --max-seq-len {args.max_seq_len}")
        records, pairs, rendered = [records[i] for i in keep], [pairs[i] for i in keep], [rendered[i] for i in keep]
    if not rendered:
        raise ValueError(f"source {source} produced no training examples")
    val_rendered = [x for x in (render(tok, r["prompt"], r["response"]) for r in val_records)
                    if len(x.ids) <= args.max_seq_len]

    # 2. familiarity: perplexity of the untuned model on exactly the responses it is trained on,
    # and, for any other source, on the human answers to the same questions (the paired reference).
    # A resumed run reads back what its start measured (minutes for 500 answers of a 0.5B model).
    # What is read back must be of these very answers (bf16 generation with another thread count
    # writes other words under the same cache key): their hash is saved with it.
    answers_sha256 = sources.inputs_hash({"measured": pairs})
    ppl, human_ppl = run.saved_perplexity(answers_sha256) if run.measured_before else (None, None)
    if ppl is None and rank == 0:
        ppl = dataset_perplexity(model, tok, pairs, batch_size=args.eval_batch_size, progress=True)
        for e in ppl["per_example"]:  # which question each value belongs to
            e["id"] = records[e["index"]]["id"]
        ppl["answers_sha256"] = answers_sha256
    if ppl and human_ppl is None and source != "human":  # measured here, or missing from what was saved
        human_ppl = human_reference_perplexity(model, tok, records, ppl, args)
    if ppl:
        run.say(f"untuned perplexity: mean {ppl['mean_ppl']:.3f}, pooled {ppl['pooled_ppl']:.3f} "
                f"over {ppl['tokens']} tokens")
    if human_ppl:
        run.say(f"the human answers to the same {human_ppl['n']} questions: mean "
                f"{human_ppl['mean_ppl']:.3f} (paired difference {source} - human "
                f"{human_ppl['difference']:+.3f} [{human_ppl['ci_low']:+.3f}, {human_ppl['ci_high']:+.3f}])")

    # 3. LoRA fine-tuning
    lora_cfg = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          targets=lora_target_list(args.lora_targets))
    inject_lora(model, lora_cfg.targets, lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout, seed=args.seed)
    trainable, total = count_parameters(model)
    run.say(f"LoRA {args.lora_targets} r={args.lora_r} alpha={args.lora_alpha}: "
            f"{trainable:,} trainable / {total:,} parameters ({100 * trainable / total:.3f}%)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    autocast_dtype = None
    scaler = None
    if ctx.device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            autocast_dtype = torch.bfloat16
        else:
            autocast_dtype = torch.float16
            scaler = torch.amp.GradScaler("cuda")
    # best: the kept epoch's validation accuracy; val_before / best_val: validation_loss() of the
    # untuned model and of the kept epoch
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "best_val": None, "val_before": None}
    if run.resuming:
        state = run.resume(model, optimizer, scaler, state)
    else:
        run.start({**vars(args), "source": source, "git_commit": git_commit(), "world_size": ctx.world,
                   "torch": torch.__version__, "device": ctx.device, "manifest": manifest,
                   "trainable_parameters": trainable, "total_parameters": total},
                  {"source": source, **ppl, **({"human": human_ppl} if human_ppl else {})} if ppl else None)
    val = tasks.splits(args.task, n_train=args.n_train, n_val=args.n_val, seed=args.seed,
                       **sources.question_overrides(args))["val"]
    fine_tune(model, optimizer, scaler, autocast_dtype, rendered, val, val_rendered, state, lora_cfg, run, args, ctx)
    # The test below loads the best epoch's adapter onto fresh weights: drop the trained model
    # first, so two copies never sit in memory together (a 7B model's 14 GB on a GPU).
    del model, optimizer, scaler
    release_freed_memory()

    # 4. test: in-domain and the other tasks, with the best adapter
    if rank != 0:
        return {}
    best = fast.apply(Transformer.from_pretrained(ctx.model_folder, args.dtype, ctx.device))
    load_adapter(best, run.adapter)
    ratios = list(update_ratios(best).values())
    results = {"source": source, "model": args.model, "task": args.task, "run_dir": str(run.path),
               "train_examples": len(rendered),
               "best_epoch": state["best_epoch"], "val_accuracy": state["best"],
               "validation_loss": validation_report(state["val_before"], state["best_val"]),
               "lora_update": {"mean_ratio": sum(ratios) / len(ratios), "max_ratio": max(ratios),
                               "layers": len(ratios)},
               "perplexity": {k: ppl[k] for k in ("n", "tokens", "mean_ppl", "pooled_ppl", "median_ppl")}}
    if human_ppl:
        results["perplexity_human"] = {k: v for k, v in human_ppl.items() if k != "per_example"}
    results["test"] = score_tasks(best, args, ctx, eval_task_list(args), run.path, source,
                                  answered_after=run.adapter_time())
    results["base"], results["base_dir"] = ctx.base, ctx.base_dir
    results["change_from_base"] = {t: results["test"][t]["accuracy"] - ctx.base[t]["accuracy"]
                                   for t in results["test"] if t in ctx.base}
    run.finish(results)
    return results


def fine_tune(model, optimizer, scaler, autocast_dtype, rendered, val, val_rendered, state: dict, lora_cfg,
              run: RunFolder, args, ctx: Context) -> None:
    """The training loop, from the epoch after `state`'s (0: the start) to --epochs. After each
    epoch, validation on held-out training-split questions (greedy accuracy, and the loss on this
    source's own answers to them) decides whether it is the best so far; `state` is updated in
    place, and the run folder gets every step's row, the best adapter and a checkpoint."""
    rank, world = ctx.rank, ctx.world
    total_steps = math.ceil(len(rendered) / args.batch_size) * args.epochs
    warmup = max(1, round(args.warmup_ratio * total_steps))
    if rank == 0 and state["epoch"] == 0:  # the untuned model (LoRA's B is still zero)
        state["val_before"] = validation_loss(model, val_rendered, args, autocast_dtype)
        run.log({"epoch": 0, "step": 0, "val_loss": state["val_before"] and state["val_before"]["loss"]})

    for epoch in range(state["epoch"], args.epochs):
        model.train()
        steps = epoch_steps(len(rendered), args.batch_size, args.seed, epoch)
        bar = progress_bar(steps, f"[{run.source}] epoch {epoch + 1}/{args.epochs}", "step", rank == 0)
        epoch_loss, epoch_tokens, seq_tokens, t0 = 0.0, 0, 0, time.time()
        for step_examples in bar:
            lr = lr_at(state["step"], total_steps, warmup, args.lr)
            loss, n_tok, gnorm = train_step(model, optimizer, rendered, step_examples, args, rank, world,
                                            autocast_dtype, scaler, lr)
            problem = nonfinite(loss, gnorm, model)
            if problem:  # stop before anything of this epoch is saved: checkpoints stay finite
                fix = "Use --dtype fp32, or lower --lr" if args.dtype == "bf16" and "loss" in problem else \
                    f"Lower --lr (now {args.lr:g}) or --grad-clip (now {args.grad_clip:g})"
                raise FloatingPointError(f"{problem} at step {state['step'] + 1} (epoch {epoch + 1}); nothing of "
                                         f"this epoch is saved, the last good checkpoint is in {run.checkpoint}. "
                                         f"{fix}.")
            state["step"] += 1
            epoch_loss += loss * n_tok
            epoch_tokens += n_tok
            seq_tokens += sum(len(rendered[i].ids) for i in step_examples)  # incl. prompts
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{seq_tokens / (time.time() - t0):.0f}")
            run.log({"epoch": epoch + 1, "step": state["step"], "loss": loss, "tokens": n_tok, "lr": lr,
                     "grad_norm": gnorm})
        model.eval()
        release_freed_memory()  # the epoch's activations, before generation (devices.py says why)
        if rank == 0:
            v = evaluate_task(model, ctx.tok, args.task, examples=val, batch_size=args.eval_batch_size,
                              max_new_tokens=args.max_new_tokens, progress=True)
            vl = validation_loss(model, val_rendered, args, autocast_dtype)
            improved = better_epoch(v["accuracy"], vl, state["best"], state["best_val"])
            row = {"epoch": epoch + 1, "step": state["step"], "train_loss": epoch_loss / max(1, epoch_tokens),
                   "val_accuracy": v["accuracy"], "val_n": v["n"], "val_loss": vl and vl["loss"],
                   "epoch_seconds": round(time.time() - t0, 1)}
            run.log(row)
            run.say(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, val accuracy {v['accuracy']:.3f} "
                    f"({v['n']} questions), val loss {vl['loss'] if vl else float('nan'):.4f}"
                    f"{' *best*' if improved else ''}")
            if improved:
                state["best"], state["best_epoch"], state["best_val"] = v["accuracy"], epoch + 1, vl
            state["epoch"] = epoch + 1
            run.save_epoch(model, optimizer, scaler, state, lora_cfg, best=improved)
        else:
            state["epoch"] = epoch + 1
        run.barrier()


# ----------------------------------------------------------------------------------------------
# The schedule and one optimiser step


def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float = 0.0) -> float:
    """Linear warmup to `peak`, then cosine decay to min_ratio * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def epoch_steps(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's optimiser steps: a permutation seeded by (seed, epoch), cut into global batches.
    Every example appears in exactly one step."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def rank_share(step_examples: list[int], rank: int, world: int) -> list[int]:
    """This process's part of a global step: every world-th example (all when world == 1)."""
    return step_examples[rank::world]


def masked_nll_sum(model, batch: Batch, autocast_dtype) -> torch.Tensor:
    """Summed NLL over the batch's supervised tokens (a scalar with grad)."""
    with torch.autocast(batch.input_ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        nll, _ = response_nll(model, batch)
    return nll.sum()


def train_step(model, optimizer, rendered, step_examples, args, rank, world, autocast_dtype, scaler, lr):
    """One optimiser step over `step_examples` (global); returns (mean loss per token, tokens)."""
    device = model.device
    mine = rank_share(step_examples, rank, world)
    # The denominator is the step's global count of supervised tokens, known before any forward.
    n_tokens = torch.tensor(float(sum(rendered[i].n_targets for i in step_examples)))
    local_sum = torch.zeros((), device=device)
    micro = length_buckets([len(rendered[i].ids) for i in mine], args.micro_batch)
    for idx in micro:
        batch = collate([rendered[mine[j]] for j in idx], args.pad_id).to(device)
        loss = masked_nll_sum(model, batch, autocast_dtype) / n_tokens.item()
        (scaler.scale(loss) if scaler else loss).backward()
        local_sum += loss.detach()
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:  # sum the per-process gradients: each already divided by the global count
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum(p.grad)
        all_reduce_sum(local_sum)
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    for g in optimizer.param_groups:
        g["lr"] = lr
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return local_sum.item(), int(n_tokens.item()), float(grad_norm)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def nonfinite(loss: float, grad_norm: float, model) -> str | None:
    """What went non-finite in a step, if anything. The loss alone is not enough: the step that
    overflows the weights (lr too high) still had a finite loss, and its NaN adapter would be saved."""
    if not math.isfinite(loss):
        return f"loss became {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm became {grad_norm}"
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            return f"LoRA weight {name} became non-finite"
    return None

# ----------------------------------------------------------------------------------------------
# Validation: which epoch is kept, and whether the run trained at all


def validation_loss(model, rendered, args, autocast_dtype) -> dict | None:
    """The loss on the source's own answers to the validation questions, as the training loss is
    computed (sum NLL / sum supervised tokens), with each example's per-token NLL for a paired
    comparison; None when the source answered none of them (a file without those questions)."""
    if not rendered:
        return None
    was_training = model.training
    model.eval()
    with torch.autocast(model.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        nlls = example_nlls(model, rendered, args.pad_id, args.eval_batch_size)
    model.train(was_training)
    return {"loss": sum(e.nll for e in nlls) / sum(e.tokens for e in nlls), "n": len(nlls),
            "per_example": [e.nll / e.tokens for e in nlls]}


def better_epoch(accuracy: float, val: dict | None, best_accuracy: float | None, best_val: dict | None) -> bool:
    """Is this epoch better than the kept one? Higher validation accuracy (the paper's rule); on a
    tie, the lower validation loss; on a tie of both, the earlier epoch is kept. (A model that
    solves no validation question ties at 0 every epoch: accuracy alone would always keep epoch 1.)"""
    if best_accuracy is None:
        return True
    if accuracy != best_accuracy:
        return accuracy > best_accuracy
    return val is not None and best_val is not None and val["loss"] < best_val["loss"]


# A tuned model counts as trained when its validation loss fell by at least this share AND the
# paired 95% interval of the per-example change lies below zero; otherwise the summary flags it.
LEARNED_MIN_DROP = 0.01


def validation_report(before: dict | None, after: dict | None) -> dict:
    """The validation loss before training and at the kept epoch, the paired change, and whether
    the run really trained (`learned`); `learned` is None without validation answers."""
    if not before or not after:
        return {"learned": None, "why": "this source answered none of the validation questions"}
    change, lo, hi = stats.paired_difference(after["per_example"], before["per_example"])
    relative = after["loss"] / before["loss"] - 1
    return {"before": before["loss"], "after": after["loss"], "relative_change": relative, "n": after["n"],
            "per_example_change": change, "ci_low": lo, "ci_high": hi,
            "learned": bool(hi < 0 and relative <= -LEARNED_MIN_DROP)}

# ----------------------------------------------------------------------------------------------
# Familiarity against the human answers, and testing


def human_reference_perplexity(model, tok, records, ppl, args) -> dict:
    """The untuned model's perplexity on the HUMAN answers to the questions `records` answers
    (those measured in `ppl`), and the paired difference source - human of the per-example
    perplexities with its bootstrap interval: the paper's familiarity gap, question by question."""
    human, _ = sources.build("human", args.model, args.task, args.n_train, args.seed, progress=False,
                             **sources.question_overrides(args))
    by_id = {r["id"]: r for r in human}
    measured = ppl["per_example"]
    pairs = [(by_id[e["id"]]["prompt"], by_id[e["id"]]["response"]) for e in measured]
    h = dataset_perplexity(model, tok, pairs, batch_size=args.eval_batch_size)
    mine = {e["index"]: e["ppl"] for e in h["per_example"]}  # index into `measured`
    src = [measured[i]["ppl"] for i in sorted(mine)]
    ref = [mine[i] for i in sorted(mine)]
    diff, lo, hi = stats.paired_difference(src, ref)
    return {"n": h["n"], "mean_ppl": h["mean_ppl"], "pooled_ppl": h["pooled_ppl"], "median_ppl": h["median_ppl"],
            "difference": diff, "ci_low": lo, "ci_high": hi, "source_lower": sum(a < b for a, b in zip(src, ref)),
            "same_text": sum(by_id[e["id"]]["response"] == records[e["index"]]["response"] for e in measured),
            "per_example": [{"id": measured[i]["id"], "ppl": mine[i]} for i in sorted(mine)]}


def eval_task_list(args) -> list[str]:
    """The training task first, then the other evaluation tasks."""
    return [args.task] + [t for t in args.eval_tasks if t != args.task]


def score_tasks(model, args, ctx: Context, task_names: list[str], folder: Path, label: str,
                answered_after: float | None = None) -> dict:
    """Accuracy with its interval on the first --n-test test questions of each task; every answer
    is written to folder/eval-<task>.jsonl. With `answered_after` (a time), a task whose answers
    file was written after it and answers exactly those questions is read back instead of scored
    again: a run killed during its tests (~40 min for the 0.5B model's five tasks on a CPU) keeps
    the tasks it finished."""
    scores = {}
    for task in task_names:
        path = folder / f"eval-{task}.jsonl"
        r = earlier_answers(path, task, args.n_test, answered_after) if answered_after is not None else None
        if r is None:
            r = evaluate_task(model, ctx.tok, task, n=args.n_test, batch_size=args.eval_batch_size,
                              max_new_tokens=args.max_new_tokens, records_path=path, progress=True)
        scores[task] = {k: r[k] for k in ("accuracy", "ci_low", "ci_high", "n")}
        release_freed_memory()
        print(f"[{label}] test {task}: {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] (n={r['n']})"
              + (f" (read back from {path.name}, answered before the run was stopped)" if "reused" in r else ""),
              flush=True)
    return scores


def earlier_answers(path: Path, task: str, n_test: int, answered_after: float) -> dict | None:
    """A test of `task` finished by an earlier attempt of this run: its answers file, if written
    after `answered_after` (the kept adapter's time, so no answers of another adapter count) and
    holding the first n_test test questions in order, scored as evaluate_task scores them; else None."""
    if not path.is_file() or path.stat().st_mtime < answered_after:
        return None
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    expected = [e.id for e in tasks.splits(task)["test"][:n_test]]
    if [r.get("id") for r in records] != expected or not all("correct" in r for r in records):
        return None
    acc, lo, hi = accuracy_ci([r["correct"] for r in records])
    return {"task": task, "n": len(records), "accuracy": acc, "ci_low": lo, "ci_high": hi, "reused": True}


def evaluate_base(args, ctx: Context) -> tuple[dict, str]:
    """The untuned model on the same test questions, once per setting (cached in the runs
    folder): the reference for forgetting. Returns (scores by task, the folder of its answers)."""
    # the folder's name and a hash of its full path: two models in folders of the same name
    # (a/model, b/model) must not share one baseline
    where = str(Path(ctx.model_folder).resolve())
    slug = f"{Path(where).name}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"
    folder = Path(args.runs_dir) / f"base-{slug}-n{args.n_test}-tok{args.max_new_tokens}-{args.dtype}"
    # two runs that start together (study.py --jobs 2) need the same baseline: the second waits
    # for the first and then reads its scores, instead of computing them again beside it
    with exclusive_lock(folder.with_name(folder.name + ".lock"), f"the untuned model's scores in {folder}",
                        wait=True):
        return scored_base(args, ctx, folder, where)


def scored_base(args, ctx: Context, folder: Path, where: str) -> tuple[dict, str]:
    """evaluate_base's work, under its lock: read the cached scores, compute the missing tasks."""
    path = folder / "results.json"
    done = {}
    if path.exists():
        try:
            done = json.loads(path.read_text()).get("test")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            done = None
        if not isinstance(done, dict):
            raise ValueError(f"{path} (the untuned model's cached scores) is damaged; delete it and run "
                             f"again to re-evaluate")
    missing = [t for t in eval_task_list(args) if t not in done]
    if missing:
        model = fast.apply(Transformer.from_pretrained(ctx.model_folder, args.dtype, ctx.device))
        for task in missing:  # saved task by task: a killed evaluation keeps the tasks it finished
            done.update(score_tasks(model, args, ctx, [task], folder, "base"))
            write_json_atomic(path, {"model": args.model, "model_folder": where, "test": done})
    return done, str(folder)

# ----------------------------------------------------------------------------------------------
# CLI


def build_parser():
    ap = argparse.ArgumentParser(description="Fine-tune on one or more response sources and compare them.",
                                 formatter_class=DefaultsHelpFormatter)
    g = ap.add_argument_group("experiment")
    g.add_argument("--source", nargs="+", default=["self"],
                   help=f"response source(s): {sources.SOURCES_HELP}")
    g.add_argument("--model", default="smollm2-135m-instruct", help="target model: short name or HF-format folder")
    g.add_argument("--task", default="gsm8k", help="training task (gsm8k or math)")
    g.add_argument("--eval-tasks", nargs="*", default=["gsm8k", "csqa"],
                   help="tasks evaluated after training (forgetting); the training task always is")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="'paper': the paper's setting (1000 examples, batch 30, 10 epochs, bf16), for a GPU "
                        "(default: none, the CPU-sized defaults below)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, sampling, LoRA init and data order")
    g.add_argument("--n-train", type=int, default=32, help="training questions (first N of the seeded shuffle)")
    g.add_argument("--n-val", type=int, default=16, help="validation questions, carved from the training split")
    g.add_argument("--n-test", type=int, default=32,
                   help="test questions per task, small for a CPU (--preset paper: all)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="longest generated answer (sources and evaluation)")
    sources.add_question_args(g)
    sources.add_generation_args(ap.add_argument_group("building sources (as sources.py; part of each set's cache key)"),
                                max_new_tokens=False)
    lo = ap.add_argument_group("LoRA")
    lo.add_argument("--lora-r", type=int, default=8, help="rank (paper: 8)")
    lo.add_argument("--lora-alpha", type=float, default=16, help="alpha; scale = alpha / r (paper: 16)")
    lo.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (paper: 0)")
    lo.add_argument("--lora-targets", default="q_proj,v_proj",
                    help="comma-separated module-name suffixes, or all-linear (paper: q_proj,v_proj)")
    o = ap.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=3, help="epochs; the best one on validation is kept")
    o.add_argument("--batch-size", type=int, default=8,
                   help="examples per optimiser step, across processes (paper: 30)")
    o.add_argument("--micro-batch", type=int, default=8, help="examples per forward pass (gradient accumulation)")
    o.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate (3e-3: the CPU sweep's best validation loss, docs/sweep; the paper: "
                        "5e-5 to 2e-4)")
    o.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps in linear warmup")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    o.add_argument("--max-seq-len", type=int, default=1024, help="drop longer training examples (counted)")
    o.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing: recompute each layer in the backward instead of keeping its "
                        "activations (far less memory, ~1.25x the step time; same gradients)")
    s = ap.add_argument_group("system")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="weights dtype (CUDA always autocasts to bf16/fp16); bf16 is ~2x faster on CPU")
    s.add_argument("--gen-dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                   help="dtype for building sources by generation (sources.py --dtype)")
    s.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    s.add_argument("--eval-batch-size", type=int, default=32,
                   help="batch size for perplexity and evaluation (32: on a CPU a decoding step of 32 rows costs "
                        "~1.5x one of 16, so evaluation generates ~1.35x faster; in fp32 greedy answers do not depend "
                        "on it; --preset paper uses 16, whose KV cache fits a 24 GB GPU beside a 7B model)")
    s.add_argument("--runs-dir", default="runs", help="where run folders go")
    s.add_argument("--run-name", default=None, help="run folder name (default: task-source-model-seed)")
    s.add_argument("--dist-timeout-hours", type=float, default=24.0,
                   help="torchrun only: how long processes wait for rank 0, which alone evaluates, builds "
                        "training sets and tests (torch's default, 10 min under NCCL, is too short for a 7B model)")
    s.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    s.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    return ap


def check_args(args) -> None:
    """ValueError, naming the flag, for a value that cannot work; run before anything is built,
    evaluated or written (the base evaluation alone takes minutes)."""
    sources.default_gen(**sources.generation_overrides(args))
    for source in args.source:
        kind, arg = sources.source_kind(source)
        if kind in sources.MODEL_SOURCES:
            check_model_name(arg)  # a teacher that does not exist: now, not after the first source trained
        if kind == "file":
            sources.file_fingerprint(arg)
    check_at_least_one(**{flag: getattr(args, flag) for flag in (  # n_test None: the whole test set
        "n_train", "n_val", "n_test", "epochs", "batch_size", "micro_batch", "eval_batch_size", "max_seq_len",
        "lora_r")})
    check_output_folder(args.runs_dir, "--runs-dir")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces it; pass one of them")
    if args.run_name is not None:
        runs = Path(args.runs_dir).resolve()
        if runs not in (runs / args.run_name).resolve().parents:
            raise ValueError(f"--run-name {args.run_name} is not a folder inside --runs-dir {args.runs_dir}; "
                             f"give a plain name")
    # AdamW's first step moves a weight by up to lr / (1 - beta1) = 10 * lr, a float32 number
    if not (math.isfinite(args.lr) and 0 < args.lr < 3e37):
        raise ValueError(f"--lr must be a number > 0 and below 3e37 (AdamW's first step, 10 x lr, must fit "
                         f"a float32); got {args.lr}")
    if not 0 <= args.warmup_ratio <= 1:
        raise ValueError(f"--warmup-ratio must be between 0 and 1; got {args.warmup_ratio}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be a finite number >= 0; got {args.weight_decay}")
    if not (math.isfinite(args.grad_clip) and args.grad_clip > 0):
        raise ValueError(f"--grad-clip must be a finite number > 0; got {args.grad_clip}")
    if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise ValueError(f"--lora-alpha must be a finite number > 0; got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1); got {args.lora_dropout}")
    tasks.check_seed(args.seed)
    if args.device is not None:
        usable_device(args.device)
    unknown = [t for t in args.eval_tasks if t not in tasks.TASKS]
    if unknown:
        raise ValueError(f"--eval-tasks: unknown {', '.join(unknown)} (use {', '.join(tasks.TASKS)})")
    if args.task in tasks.TASKS and tasks.has_train(args.task):  # sizes that fit, questions that match
        chosen = tasks.splits(args.task, n_train=args.n_train, n_val=args.n_val, seed=args.seed,
                              **sources.question_overrides(args))
        if chosen.get("unmatched") or chosen.get("repeated"):
            print(f"--train-questions {args.train_questions}: skipped {len(chosen['unmatched'])} questions not in "
                  f"{args.task}'s training split and {len(chosen['repeated'])} repeats", flush=True)
        for source in args.source:  # a file that matches nothing, or a cache that cannot be written
            sources.check_buildable(source, args.model, args.task, args.n_train, args.seed, args.gen_dtype,
                                    **sources.question_overrides(args), **sources.generation_overrides(args))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with a --preset's values as the defaults: whatever the user typed still
    wins, however it was typed (`--lr=1e-4`, an abbreviated `--epoch 3`)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.preset:
        ap.set_defaults(**PRESETS[args.preset])
        args = ap.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.run_name and len(args.source) > 1:
        sys.exit("error: --run-name names one run; drop it when training several sources")
    try:
        wait = datetime.timedelta(hours=args.dist_timeout_hours)
    except (OverflowError, ValueError):  # inf, nan, or beyond timedelta's range
        wait = None
    if wait is None or wait < datetime.timedelta(milliseconds=1):
        sys.exit(f"error: --dist-timeout-hours must be a finite number of hours, at least 1 ms; "
                 f"got {args.dist_timeout_hours}")
    try:  # before anything is built or written
        check_args(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.task not in tasks.TASKS or not tasks.has_train(args.task):
        trainable = [t for t in tasks.TASKS if tasks.has_train(t)]
        sys.exit(f"error: --task {args.task} has no training split here; train on one of {', '.join(trainable)}")
    rank, world = dist_setup(wait)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = args.device or best_device()
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    held = contextlib.ExitStack()  # the run folders' locks, released however main ends
    try:
        for source in args.source:  # a run folder clash is an error now, not after hours of work
            held.enter_context(claim(source, args, rank))
        folder = resolve_model(args.model)
        check_lora_targets(folder, args.lora_targets)
        tok = Tokenizer.from_folder(folder)
        args.pad_id = tok.pad_id
        ctx = Context(folder, tok, rank, world, device)
        if rank == 0:
            ctx.base, ctx.base_dir = evaluate_base(args, ctx)
        all_results = [run_source(source, args, ctx) for source in args.source]
        leave_together(world, wait)
    except (ModelLoadError, FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    finally:
        held.close()
        close_process_group()
    if rank == 0:
        print_summary(all_results)


def print_summary(results: list[dict]):
    print("\n=== summary ===")
    tasks_ = list(dict.fromkeys(t for r in results for t in r["test"]))  # in-domain first
    w = max([24] + [len(r["source"]) for r in results])  # teacher:<model> names run long
    print(f"{'source':<{w}} {'train ppl':>9} {'val loss before>after':>21} {'|dW|/|W|':>8} {'best ep':>7} "
          + " ".join(f"{t:>16}" for t in tasks_))
    for r in results:
        cells = [f"{r['test'][t]['accuracy']:.3f}±{(r['test'][t]['ci_high'] - r['test'][t]['ci_low']) / 2:.3f}"
                 if t in r["test"] else "-" for t in tasks_]
        v = r["validation_loss"]
        val = f"{v['before']:.3f}>{v['after']:.3f} {100 * v['relative_change']:+.0f}%" if "before" in v else "n/a"
        flag = "" if v["learned"] else "  [!]"
        print(f"{r['source']:<{w}} {r['perplexity']['mean_ppl']:>9.3f} {val:>21} "
              f"{r['lora_update']['mean_ratio']:>8.1e} "
              f"{str(r['best_epoch']):>7} " + " ".join(f"{c:>16}" for c in cells) + flag)
    for r in results:
        v = r["validation_loss"]
        if v["learned"] is None:
            print(f"[!] {r['source']}: {v['why']}; whether training moved the model is unknown")
        elif not v["learned"]:
            print(f"[!] {r['source']}: the validation loss did not fall clearly "
                  f"({v['before']:.3f} -> {v['after']:.3f}, "
                  f"per-example change {v['per_example_change']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]): "
                  f"the tuned model is still close to the untuned one, so its scores are not a result; "
                  f"train longer or with a higher --lr")
    for r in results:
        if "perplexity_human" in r:
            print(familiarity_line(r))
    for r in results:
        print(f"run folder: {r['run_dir']}")


def familiarity_line(r: dict) -> str:
    """One sentence on the paired perplexity gap between a source and the human answers."""
    h = r["perplexity_human"]
    gap = (f"{r['source']} {r['perplexity']['mean_ppl']:.3f} vs human {h['mean_ppl']:.3f} on the same {h['n']} "
           f"questions, paired difference {h['difference']:+.3f} [{h['ci_low']:+.3f}, {h['ci_high']:+.3f}], "
           f"{r['source']} lower on {h['source_lower']} of {h['n']}"
           + (f", the very human text on {h['same_text']}" if h.get("same_text") else ""))
    if h["ci_high"] < 0:
        meaning = (f"the untuned model finds {r['source']}'s answers more familiar than the human ones, which the "
                   f"paper says makes them easier to learn from")
    elif h["ci_low"] > 0:
        meaning = f"the untuned model finds {r['source']}'s answers LESS familiar than the human ones"
    else:
        meaning = "no clear familiarity gap at this many questions"
    return f"familiarity: {gap}: {meaning}."


def lora_target_list(lora_targets: str) -> list[str] | str:
    return lora_targets if lora_targets == "all-linear" else lora_targets.split(",")


def check_lora_targets(model_folder: Path, lora_targets: str) -> None:
    """ValueError now if --lora-targets selects no layer of this model (shapes only, no weights),
    rather than after the base evaluation and the training set."""
    with torch.device("meta"):
        shapes = Transformer(ModelConfig.from_json(Path(model_folder) / "config.json"))
    if not target_module_names(shapes, lora_target_list(lora_targets)):
        raise ValueError(f"--lora-targets {lora_targets} selects no linear layer of this model (names look "
                         f"like model.layers.0.self_attn.q_proj; e.g. q_proj,v_proj or all-linear)")


if __name__ == "__main__":
    main()
