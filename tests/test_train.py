"""train.py: the loop sees every example once per epoch, weights the loss by tokens across
micro-batches and processes, resumes exactly, learns, and matches itself under torchrun."""

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import runfolder
import train
from data import collate, render
from model import Transformer
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def base_args(tiny_dir, tmp_path, **over):
    args = ["--source", "human", "--model", str(tiny_dir), "--n-train", "12", "--n-val", "2",
            "--n-test", "2", "--eval-tasks", "gsm8k", "--max-new-tokens", "4", "--epochs", "2",
            "--batch-size", "4", "--micro-batch", "2", "--lr", "1e-2", "--runs-dir", str(tmp_path / "runs"),
            "--run-name", "r"]
    for k, v in over.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.fixture(autouse=True)
def sources_cache(tmp_path, monkeypatch):
    import sources
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "sources")


def test_every_example_once_per_epoch_across_ranks():
    for n, bs, world in [(30, 30, 1), (31, 8, 2), (7, 4, 3), (100, 30, 4)]:
        for epoch in range(3):
            steps = train.epoch_steps(n, bs, seed=0, epoch=epoch)
            seen = [i for s in steps for r in range(world) for i in train.rank_share(s, r, world)]
            assert sorted(seen) == list(range(n))
    assert train.epoch_steps(30, 8, 0, 0) != train.epoch_steps(30, 8, 0, 1)  # reshuffled each epoch


def lora_model(tiny_dir, dtype="fp32", dropout=0.0):
    """The tiny model with LoRA on q/v (r 4, alpha 8) whose A and B are all random (seed 0), so
    that every LoRA parameter gets a gradient."""
    from lora import inject_lora
    torch.manual_seed(0)
    model = Transformer.from_pretrained(tiny_dir, dtype)
    inject_lora(model, ["q_proj", "v_proj"], 4, 8, dropout, seed=0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    return model


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """How many times torch.utils.checkpoint.checkpoint ran (one call per recomputed layer)."""
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    return calls


def test_loss_is_weighted_by_tokens_across_micro_batches(tiny_dir):
    """One optimiser step's gradient equals that of sum(NLL)/sum(tokens) over the whole step,
    however the step is cut into micro-batches (a mean of micro-batch means would differ)."""
    tok = Tokenizer.from_folder(tiny_dir)
    rendered = [render(tok, f"q{i}", "word " * (1 + 7 * i) + "Final Answer: 1") for i in range(5)]

    def grads(micro):
        model = lora_model(tiny_dir)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        args = type("A", (), {"micro_batch": micro, "pad_id": tok.pad_id, "grad_clip": 1e9})()
        captured = {}
        orig_step = opt.step
        opt.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.requires_grad}) or orig_step()
        loss, n_tok, _ = train.train_step(model, opt, rendered, list(range(5)), args, 0, 1, None, None, 0.0)
        return loss, n_tok, captured, model

    loss1, n1, g1, model = grads(5)
    loss2, n2, g2, _ = grads(1)
    assert n1 == n2 == sum(r.n_targets for r in rendered)
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-6, rtol=1e-4), k
    # and both are those of sum(NLL) / sum(tokens) over one batch of all five (lr 0: same weights)
    from nll import response_nll
    nll, n = response_nll(model, collate(rendered, tok.pad_id))
    assert n.sum().item() == n1
    reference = nll.sum() / n.sum()
    assert loss1 == pytest.approx(reference.item(), rel=1e-5)
    model.zero_grad()
    reference.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, g1[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_grad_checkpoint_gives_the_same_gradients(tiny_dir, dtype, checkpoint_calls):
    """--grad-checkpoint recomputes each layer in the backward (counted here) and changes no
    gradient: rows of different lengths (the packed path), LoRA dropout on (same masks again)."""
    tok = Tokenizer.from_folder(tiny_dir)
    rendered = [render(tok, f"q{i}", "word " * (1 + 5 * i) + "Final Answer: 1") for i in range(3)]
    batch = collate(rendered, tok.pad_id)
    calls = checkpoint_calls

    def grads(recompute):
        model = lora_model(tiny_dir, dtype, dropout=0.3)
        model.train()
        model.gradient_checkpointing = recompute
        torch.manual_seed(1)  # the same dropout draws in both runs
        train.masked_nll_sum(model, batch, None).backward()
        with torch.no_grad():  # no gradient needed: nothing to recompute
            model(batch.input_ids)
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain = grads(False)
    assert calls == []
    again = grads(True)
    assert len(calls) == 2  # each of the tiny model's 2 layers once, in the forward with gradients
    for name in plain:
        assert torch.equal(plain[name], again[name]), name


def test_a_run_with_grad_checkpoint_trains_the_same_adapter(tiny_dir, tmp_path, checkpoint_calls):
    calls = checkpoint_calls
    train.main(base_args(tiny_dir, tmp_path / "a", epochs=1))
    assert calls == []
    train.main(base_args(tiny_dir, tmp_path / "b", epochs=1) + ["--grad-checkpoint"])
    assert len(calls) == 2 * 6  # 2 layers x 6 micro-batches (12 examples, 2 per forward)
    a, b = adapter(tmp_path / "a" / "runs" / "r"), adapter(tmp_path / "b" / "runs" / "r")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "runs" / "r" / "config.json").read_text())["grad_checkpoint"] is True


def test_lr_schedule_and_gradient_clipping(tiny_dir, tmp_path):
    """Linear warmup then cosine decay, as written here; the update uses the clipped gradient
    while the returned norm is the one before clipping."""
    import math
    peak, total, warmup = 1e-3, 10, 3
    expected = [peak * (s + 1) / warmup if s < warmup
                else 0.5 * peak * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(total)]
    assert [train.lr_at(s, total, warmup, peak) for s in range(total)] == pytest.approx(expected)
    assert train.lr_at(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-15)
    assert train.lr_at(5, 10, 3, peak, min_ratio=0.1) == pytest.approx(
        peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 7))))
    # the run's metrics log the schedule step by step: 12 examples / batch 4 x 2 epochs = 6 steps
    train.main(base_args(tiny_dir, tmp_path, warmup_ratio=0.34))
    rows = [json.loads(line) for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs == pytest.approx([train.lr_at(s, 6, 2, 1e-2) for s in range(6)])
    assert lrs[1] == pytest.approx(1e-2) and lrs[0] == pytest.approx(5e-3) and lrs[-1] < lrs[2]

    tok = Tokenizer.from_folder(tiny_dir)
    rendered = [render(tok, f"q{i}", "word " * (2 + i) + "Final Answer: 1") for i in range(3)]
    model = lora_model(tiny_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    seen = {}
    orig_step = opt.step
    opt.step = lambda: seen.update(lr=opt.param_groups[0]["lr"], norm=torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad) for p in params]))) or orig_step()
    args = type("A", (), {"micro_batch": 3, "pad_id": tok.pad_id, "grad_clip": 1e-3})()
    _, _, gnorm = train.train_step(model, opt, rendered, [0, 1, 2], args, 0, 1, None, None, 3e-4)
    assert seen["lr"] == 3e-4  # the schedule's value reaches the optimizer
    assert gnorm > 1e-2  # the unclipped norm is reported
    assert seen["norm"].item() == pytest.approx(1e-3, rel=1e-3)  # the optimizer saw the clipped one


def adapter(run_dir):
    return load_file(Path(run_dir) / "checkpoint" / "adapter" / "adapter_model.safetensors")


def test_run_folder_and_loss_falls(tiny_dir, tmp_path):
    train.main(base_args(tiny_dir, tmp_path, epochs=3))
    run = tmp_path / "runs" / "r"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["seed"] == 0 and cfg["lora_r"] == 8 and "git_commit" in cfg and cfg["source"] == "human"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "train_loss" in r]
    assert len(epochs) == 3 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    results = json.loads((run / "results.json").read_text())
    assert results["perplexity"]["n"] == 12 and "gsm8k" in results["test"]
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "eval-gsm8k.jsonl").is_file()


def test_perplexity_covers_exactly_the_trained_examples(tiny_dir, tmp_path):
    """Examples over --max-seq-len are not trained on, so their perplexity is not reported either."""
    import sources
    tok = Tokenizer.from_folder(tiny_dir)
    records, _ = sources.build("human", str(tiny_dir), "gsm8k", 12, 0, progress=False)
    lengths = sorted(len(render(tok, r["prompt"], r["response"]).ids) for r in records)
    limit = lengths[len(lengths) // 2]  # about half the examples are longer
    trained = [r["id"] for r in records if len(render(tok, r["prompt"], r["response"]).ids) <= limit]
    assert 0 < len(trained) < len(records)
    train.main(base_args(tiny_dir, tmp_path, epochs=1, max_seq_len=limit))
    run = tmp_path / "runs" / "r"
    results = json.loads((run / "results.json").read_text())
    assert results["train_examples"] == results["perplexity"]["n"] == len(trained)
    ppl = json.loads((run / "perplexity.json").read_text())
    assert [e["id"] for e in ppl["per_example"]] == trained


def test_the_best_epoch_adapter_is_kept_and_tested(tiny_dir, tmp_path, monkeypatch):
    """adapter/ holds the epoch with the highest validation accuracy (on a tie, the lower
    validation loss), not the last epoch; the test scores and the change from the base model come
    from it."""
    import eval as ev
    real_evaluate = ev.evaluate_task
    val_scores = iter([0.25, 0.75, 0.75])  # epochs 1, 2, 3: epoch 3 ties epoch 2 ...
    val_losses = iter([6.0, 5.9, 5.7, 5.8])  # untuned, epochs 1, 2, 3: ... and epoch 2's loss is lower
    monkeypatch.setattr(train, "validation_loss", lambda *a: {"loss": (v := next(val_losses)), "n": 2,
                                                             "per_example": [v - 0.1, v + 0.1]})

    def scripted_validation(model, tok, task, n=None, examples=None, **kw):
        if examples is None:  # test questions: scored for real
            return real_evaluate(model, tok, task, n=n, **kw)
        return {"task": task, "n": len(examples), "accuracy": next(val_scores), "ci_low": 0.0, "ci_high": 1.0,
                "records": []}
    monkeypatch.setattr(train, "evaluate_task", scripted_validation)
    real_save = runfolder.save_checkpoint
    per_epoch = []

    def save_and_keep(folder, *a, **k):
        real_save(folder, *a, **k)
        per_epoch.append(load_file(Path(folder) / "adapter" / "adapter_model.safetensors"))
    monkeypatch.setattr(runfolder, "save_checkpoint", save_and_keep)
    scored = []
    monkeypatch.setattr(train, "score_tasks", lambda model, *a, **k: scored.append(
        {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k})
        or {"gsm8k": {"accuracy": 0.5, "ci_low": 0.1, "ci_high": 0.9, "n": 2}})
    train.main(base_args(tiny_dir, tmp_path, epochs=3))
    run = tmp_path / "runs" / "r"
    results = json.loads((run / "results.json").read_text())
    assert results["best_epoch"] == 2 and results["val_accuracy"] == 0.75
    kept = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(per_epoch) == 3 and kept.keys() == per_epoch[1].keys()
    assert all(torch.equal(kept[k], per_epoch[1][k]) for k in kept)
    assert any(not torch.equal(kept[k], per_epoch[2][k]) for k in kept)  # the last epoch differs
    tested = scored[-1]  # the model the test scores come from carries epoch 2's weights
    assert len(tested) == len(kept) and all(torch.equal(t, kept[k]) for t, k in
                                            zip((tested[n] for n in sorted(tested)), sorted(kept)))
    base = results["base"]["gsm8k"]["accuracy"]
    assert results["change_from_base"] == {"gsm8k": pytest.approx(0.5 - base)}
    v = results["validation_loss"]  # before training vs the kept epoch 2
    assert (v["before"], v["after"]) == (6.0, 5.7) and v["relative_change"] == pytest.approx(5.7 / 6.0 - 1)
    assert v["per_example_change"] == pytest.approx(-0.3) and v["learned"] is True


@pytest.mark.parametrize("acc, loss, best_acc, best_loss, better", [
    (0.5, 9.0, None, None, True),  # the first epoch is always kept
    (0.5, 9.0, 0.25, 1.0, True),  # higher accuracy wins whatever the loss
    (0.25, 1.0, 0.5, 9.0, False),
    (0.5, 2.0, 0.5, 3.0, True),  # a tie in accuracy: the lower loss
    (0.5, 3.0, 0.5, 2.0, False),
    (0.5, 2.0, 0.5, 2.0, False),  # a tie in both: the earlier epoch stays
    (0.5, None, 0.5, 2.0, False),  # no validation answers: accuracy alone, ties keep the earlier
])
def test_better_epoch(acc, loss, best_acc, best_loss, better):
    val = None if loss is None else {"loss": loss}
    best_val = None if best_loss is None else {"loss": best_loss}
    assert train.better_epoch(acc, val, best_acc, best_val) is better


def test_validation_report_flags_a_run_that_did_not_learn():
    """learned needs a 1% drop of the loss AND a paired interval below zero; the hand-computed
    numbers: before [2, 2, 2, 2] -> after [1.9, 1.9, 1.9, 1.9] is a 5% drop, every example lower."""
    before = {"loss": 2.0, "n": 4, "per_example": [2.0] * 4}
    fell = train.validation_report(before, {"loss": 1.9, "n": 4, "per_example": [1.9] * 4})
    assert fell["learned"] is True and fell["relative_change"] == pytest.approx(-0.05)
    assert fell["ci_low"] == fell["ci_high"] == pytest.approx(-0.1)
    tiny = train.validation_report(before, {"loss": 1.995, "n": 4, "per_example": [1.995] * 4})
    assert tiny["learned"] is False  # below zero, but a 0.25% drop
    noisy = train.validation_report(before, {"loss": 1.9, "n": 4, "per_example": [1.5, 2.5, 1.6, 2.0]})
    assert noisy["learned"] is False and noisy["ci_high"] > 0  # 5% lower on average, not clearly
    assert train.validation_report(before, None)["learned"] is None


def test_resume_after_kill_gives_the_same_adapter(tiny_dir, tmp_path, monkeypatch):
    train.main(base_args(tiny_dir, tmp_path / "straight", epochs=3))
    straight = adapter(tmp_path / "straight" / "runs" / "r")

    real_save = runfolder.save_checkpoint
    saves = []

    def killed_after_first_epoch(*a, **k):
        real_save(*a, **k)
        saves.append(1)
        if len(saves) == 1:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(runfolder, "save_checkpoint", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(base_args(tiny_dir, tmp_path / "killed", epochs=3))
    monkeypatch.setattr(runfolder, "save_checkpoint", real_save)
    with pytest.raises(SystemExit, match="already exists"):  # no silent overwrite
        train.main(base_args(tiny_dir, tmp_path / "killed", epochs=3))
    # the untuned perplexity was measured when the run started: the resumed run reads it back
    monkeypatch.setattr(train, "dataset_perplexity", lambda *a, **k: pytest.fail("measured again on --resume"))
    train.main(base_args(tiny_dir, tmp_path / "killed", epochs=3) + ["--resume"])
    resumed = adapter(tmp_path / "killed" / "runs" / "r")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.allclose(straight[k], resumed[k], atol=1e-6), k
    results = [json.loads((tmp_path / t / "runs" / "r" / "results.json").read_text()) for t in ("straight", "killed")]
    assert results[0]["perplexity"] == results[1]["perplexity"]


def test_saved_perplexity_reads_back_what_the_start_wrote(tmp_path):
    """perplexity.json as start() writes it gives back the source's and the human reference's
    values; a torn file, other answer texts or another rank give nothing (the run measures again)."""
    args = train.parse_args(["--source", "self", "--runs-dir", str(tmp_path), "--run-name", "r"])
    ppl = {"n": 2, "mean_ppl": 3.5, "per_example": [{"index": 0, "id": "q1", "ppl": 3.0}], "answers_sha256": "ab"}
    human = {"n": 2, "mean_ppl": 4.25, "difference": -0.75}
    run, other_rank = runfolder.RunFolder("self", args), runfolder.RunFolder("self", args, rank=1, world=2)
    run.start({"epochs": 1}, {"source": "self", **ppl, "human": human})
    assert run.saved_perplexity("ab") == (ppl, human)
    assert run.saved_perplexity("cd") == (None, None)  # of other answer texts
    assert other_rank.saved_perplexity("ab") == (None, None)
    (run.path / "perplexity.json").write_text('{"n": 2, "mean_')
    assert run.saved_perplexity("ab") == (None, None)


def test_nan_loss_stops_with_a_clear_message(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "masked_nll_sum", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="loss became nan"):
        train.main(base_args(tiny_dir, tmp_path))


def test_torchrun_two_processes_match_one(tiny_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "ILB_SOURCES_DIR": str(tmp_path / "sources")}
    outs = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(ROOT / "train.py")] + base_args(tiny_dir, tmp_path / f"p{n}")
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-3000:]
        outs[n] = adapter(tmp_path / f"p{n}" / "runs" / "r")
        assert json.loads((tmp_path / f"p{n}" / "runs" / "r" / "config.json").read_text())["world_size"] == n
    assert any(k.endswith("lora_B.weight") and outs[1][k].abs().max() > 1e-4 for k in outs[1])  # it trained
    for k in outs[1]:
        assert torch.allclose(outs[1][k], outs[2][k], atol=1e-5), k


def test_waiting_ranks_use_the_given_timeout(monkeypatch):
    """Under torchrun the other ranks wait for rank 0's evaluations at barriers, for hours with a
    7B model: the process group must get --dist-timeout-hours, not torch's 10-minute default."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runfolder.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runfolder.dist, "init_process_group", lambda backend, timeout: seen.update(backend=backend, timeout=timeout))
    monkeypatch.setattr(runfolder.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(runfolder.torch.cuda, "is_available", lambda: False)
    assert runfolder.dist_setup(datetime.timedelta(hours=3)) == (1, 2)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(hours=3)}
    assert train.build_parser().parse_args([]).dist_timeout_hours == 24
    for bad in ("0", "-1", "inf", "nan", "1e-9"):
        with pytest.raises(SystemExit, match="--dist-timeout-hours must be a finite number of hours, at least 1 ms"):
            train.main(["--dist-timeout-hours", bad])


def test_preset_gives_defaults_and_typed_flags_win():
    paper = train.PRESETS["paper"]
    plain = train.parse_args([])
    assert (plain.lr, plain.epochs) != (paper["lr"], paper["epochs"])  # else this test shows nothing
    args = train.parse_args(["--preset", "paper"])
    assert {k: getattr(args, k) for k in paper} == paper
    for argv in (["--lr", "1e-4"], ["--lr=1e-4"]):
        args = train.parse_args(["--preset", "paper", *argv])
        assert (args.lr, args.epochs) == (1e-4, paper["epochs"])
    args = train.parse_args(["--preset", "paper", "--epoch", "3"])  # argparse's abbreviation
    assert (args.lr, args.epochs) == (paper["lr"], 3)


def test_torchrun_ranks_give_up_after_the_timeout(tiny_dir, tmp_path):
    """The flag reaches the real process group: at 1 ms, torch gives up after exactly that long
    (setting the group up, or at the first barrier if both ranks met within 1 ms) and the run
    fails, where the default run above passes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "ILB_SOURCES_DIR": str(tmp_path / "sources")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py")] + base_args(tiny_dir, tmp_path, dist_timeout_hours=0.001 / 3600)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode != 0
    # gloo and the store say "timed out after 1ms", "wait timeout after 1ms" or "Timed out waiting 1ms"
    assert re.search(r"(timed out|timeout)\D{0,12}\b1 ?ms", p.stderr, re.I), p.stderr[-3000:]


def finished_run(tiny_dir, tmp_path):
    train.main(base_args(tiny_dir, tmp_path, epochs=1))
    run = tmp_path / "runs" / "r"
    assert (run / "results.json").is_file() and (run / "checkpoint" / "trainer.pt").is_file()
    return run


def test_overwrite_keeps_the_finished_run_until_the_new_one_finishes(tiny_dir, tmp_path, monkeypatch):
    run = finished_run(tiny_dir, tmp_path)
    old_results = (run / "results.json").read_text()
    real_step = train.train_step

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(base_args(tiny_dir, tmp_path, epochs=1, lr=0.02) + ["--overwrite"])
    kept = run.with_name("r.replaced")
    assert (kept / "results.json").read_text() == old_results and (kept / "adapter").is_dir()
    assert not (run / "results.json").exists()  # the new run did not finish
    monkeypatch.setattr(train, "train_step", real_step)
    with pytest.raises(KeyboardInterrupt):  # another failed attempt keeps the same finished run
        monkeypatch.setattr(train, "train_step", killed)
        train.main(base_args(tiny_dir, tmp_path, epochs=1, lr=0.02) + ["--overwrite"])
    assert (kept / "results.json").read_text() == old_results
    monkeypatch.setattr(train, "train_step", real_step)
    train.main(base_args(tiny_dir, tmp_path, epochs=1, lr=0.02) + ["--overwrite"])
    assert not kept.exists() and json.loads((run / "config.json").read_text())["lr"] == 0.02
    assert (run / "results.json").is_file()


def test_resume_before_the_first_checkpoint_starts_again(tiny_dir, tmp_path, monkeypatch):
    real_step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        train.main(base_args(tiny_dir, tmp_path, epochs=1))
    run = tmp_path / "runs" / "r"
    assert (run / "config.json").is_file() and not (run / "checkpoint").exists()
    saved = json.loads((run / "perplexity.json").read_text())
    monkeypatch.setattr(train, "train_step", real_step)
    # the same settings: the untuned perplexity its start measured is read back, not measured again
    monkeypatch.setattr(train, "dataset_perplexity", lambda *a, **k: pytest.fail("measured again on --resume"))
    train.main(base_args(tiny_dir, tmp_path, epochs=1) + ["--resume"])
    assert (run / "results.json").is_file()
    assert json.loads((run / "perplexity.json").read_text()) == saved
    assert json.loads((run / "results.json").read_text())["perplexity"]["mean_ppl"] == saved["mean_ppl"]


def test_resume_before_the_first_checkpoint_with_other_settings_measures_again(tiny_dir, tmp_path, monkeypatch):
    """Without a checkpoint, --resume with another learning rate starts a new run (nothing is
    lost); what the first start measured belongs to other settings, so it is measured again."""
    real_step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        train.main(base_args(tiny_dir, tmp_path, epochs=1))
    monkeypatch.setattr(train, "train_step", real_step)
    measured = []
    real_perplexity = train.dataset_perplexity
    monkeypatch.setattr(train, "dataset_perplexity", lambda *a, **k: measured.append(1) or real_perplexity(*a, **k))
    train.main(base_args(tiny_dir, tmp_path, epochs=1, lr=0.02) + ["--resume"])
    run = tmp_path / "runs" / "r"
    assert measured and json.loads((run / "config.json").read_text())["lr"] == 0.02
    assert (run / "results.json").is_file()


def test_resume_measures_again_when_the_saved_perplexity_is_not_of_these_answers(tiny_dir, tmp_path, monkeypatch):
    """A torn perplexity.json, or one measured on a training set rebuilt since with other words
    (the cache key names the inputs, not the text), is measured again, not read back."""
    real_step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        train.main(base_args(tiny_dir, tmp_path, epochs=1))
    run = tmp_path / "runs" / "r"
    saved = json.loads((run / "perplexity.json").read_text())
    # the cached set rebuilt with another first answer (as bf16 generation with other threads would)
    data = next((tmp_path / "sources").rglob("human-*/data.jsonl"))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["response"] = "A different answer. Final Answer: 7"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    measured = []
    real_perplexity = train.dataset_perplexity
    monkeypatch.setattr(train, "dataset_perplexity", lambda *a, **k: measured.append(1) or real_perplexity(*a, **k))
    with pytest.raises(KeyboardInterrupt):
        train.main(base_args(tiny_dir, tmp_path, epochs=1) + ["--resume"])
    assert measured
    again = json.loads((run / "perplexity.json").read_text())
    assert again["answers_sha256"] != saved["answers_sha256"]
    assert again["per_example"][0]["ppl"] != saved["per_example"][0]["ppl"]
    # a torn perplexity.json: measured again too, and the run finishes
    (run / "perplexity.json").write_text(json.dumps(again)[:50])
    measured.clear()
    monkeypatch.setattr(train, "train_step", real_step)
    train.main(base_args(tiny_dir, tmp_path, epochs=1) + ["--resume"])
    assert measured and (run / "results.json").is_file()
    assert json.loads((run / "perplexity.json").read_text())["answers_sha256"] == again["answers_sha256"]

def test_started_with_these_settings_needs_a_readable_config_of_the_same_run(tmp_path):
    args = train.parse_args(["--source", "human", "--runs-dir", str(tmp_path), "--run-name", "r", "--resume"])
    run = tmp_path / "r"
    run.mkdir()
    assert not runfolder.started_with_these_settings(run, "human", args)  # no config.json
    config = {**vars(args), "source": "human", "manifest": {"inputs_sha256": runfolder.training_set_hash("human", args)}}
    (run / "config.json").write_text(json.dumps(config))
    assert runfolder.started_with_these_settings(run, "human", args)
    assert not runfolder.started_with_these_settings(run, "self", args)  # another source's run
    (run / "config.json").write_text(json.dumps({**config, "lr": 1.0}))
    assert not runfolder.started_with_these_settings(run, "human", args)
    (run / "config.json").write_text(json.dumps(config)[:40])  # torn: measured again, no error
    assert not runfolder.started_with_these_settings(run, "human", args)


def test_resume_refuses_other_settings(tiny_dir, tmp_path):
    run = finished_run(tiny_dir, tmp_path)
    config = (run / "config.json").read_text()
    for flag, value, shown in (("lr", "5e-4", "--lr 0.01 -> 0.0005"), ("epochs", "2", "--epochs 1 -> 2"),
                               ("n_train", "6", "--n-train 12 -> 6")):
        with pytest.raises(SystemExit, match=f"these differ: {re.escape(shown)}"):
            train.main(base_args(tiny_dir, tmp_path, **{"epochs": 1, flag: value}) + ["--resume"])
    with pytest.raises(SystemExit, match="these differ: --source human -> self"):  # --run-name hides the source
        train.main(base_args(tiny_dir, tmp_path, epochs=1, source="self") + ["--resume"])
    saved = json.loads(config)
    saved["manifest"]["inputs_sha256"] = "0" * 16  # as if built with other generation settings or rules
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="these differ: the training set"):
        train.main(base_args(tiny_dir, tmp_path, epochs=1) + ["--resume"])
    (run / "config.json").write_text(config)
    # the same settings, also typed out (the defaults of generation flags), and another device
    # string or evaluation batch, are fine
    train.main(base_args(tiny_dir, tmp_path, epochs=1, eval_batch_size=3, k=2, temperature=0.7)
               + ["--resume", "--device", "cpu"])


def test_base_scores_are_not_shared_by_models_in_folders_of_the_same_name(tiny_dir, tmp_path, monkeypatch):
    import shutil
    scored = []
    monkeypatch.setattr(train, "score_tasks", lambda model, args, ctx, tasks_, folder, label: (
        scored.append(ctx.model_folder), {t: {"accuracy": 0.5} for t in tasks_})[1])
    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(lambda cls, *a, **k: torch.nn.Module()))  # never run
    for where in ("a", "b"):
        shutil.copytree(tiny_dir, tmp_path / where / "m")
    args = train.parse_args(base_args(tiny_dir, tmp_path))
    for where in ("a", "b", "a"):
        ctx = train.Context(tmp_path / where / "m", None, 0, 1, "cpu")
        assert train.evaluate_base(args, ctx)[0] == {"gsm8k": {"accuracy": 0.5}}
    assert scored == [tmp_path / "a" / "m", tmp_path / "b" / "m"]  # "a" again: its own cached scores
    bases = sorted((tmp_path / "runs").glob("base-m-*"))
    assert len(bases) == 2
    for base in bases:
        (base / "results.json").write_text("[]")
    with pytest.raises(ValueError, match="is damaged; delete it"):
        train.evaluate_base(args, train.Context(tmp_path / "a" / "m", None, 0, 1, "cpu"))


def test_two_runs_starting_together_score_the_untuned_model_once(tiny_dir, tmp_path, monkeypatch):
    """study.py --jobs 2 starts two runs at once: the second waits on the baseline's lock, then
    reads the first one's scores (each task scored once in all, both get the same scores)."""
    import threading
    import time
    scored = []

    def slow_score(model, args, ctx, tasks_, folder, label):
        scored.extend(tasks_)
        time.sleep(0.3)  # long enough for the other thread to arrive while this one holds the lock
        return {t: {"accuracy": 0.5} for t in tasks_}
    monkeypatch.setattr(train, "score_tasks", slow_score)
    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(lambda cls, *a, **k: torch.nn.Module()))  # never run
    args = train.parse_args(base_args(tiny_dir, tmp_path) + ["--eval-tasks", "gsm8k", "csqa"])
    ctx = train.Context(tiny_dir, None, 0, 1, "cpu")
    got = []
    threads = [threading.Thread(target=lambda: got.append(train.evaluate_base(args, ctx)[0])) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(scored) == ["csqa", "gsm8k"]
    assert got[0] == got[1] == {"gsm8k": {"accuracy": 0.5}, "csqa": {"accuracy": 0.5}}


@pytest.mark.parametrize("flags,needle", [
    (["--batch-size", "0"], "--batch-size must be at least 1"), (["--n-test", "-1"], "--n-test must be at least 1"),
    (["--warmup-ratio", "nan"], "--warmup-ratio must be between 0 and 1"), (["--lr", "inf"], "--lr must be a number > 0 and below 3e37"),
    (["--lr", "1e38"], "AdamW's first step, 10 x lr, must fit a float32"),
    (["--seed", str(2 ** 70)], "--seed must be between 0"), (["--source", "human", "bogus"], "unknown source 'bogus'"),
    (["--device", "nosuch"], "unknown device 'nosuch'"),
    (["--source", "human", "teacher:nosuch"], "unknown model 'nosuch'"),
    (["--source", "paraphrase:nosuch"], "unknown model 'nosuch'"),
    (["--source", "step-by-step:nosuch"], "unknown model 'nosuch'"),
    (["--source", "file:/nonexistent.json"], "file source /nonexistent.json does not exist"),
    (["--eval-tasks", "nosuch"], "--eval-tasks: unknown nosuch"), (["--n-train", "10000000"], "n_train=10000000"),
    (["--seed", str(2 ** 30)], "--seed must be between 0 and 2**30 - 1"),
    (["--train-questions", "/nonexistent.json"], "--train-questions /nonexistent.json does not exist")])
def test_bad_flags_stop_before_anything_runs(flags, needle, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--runs-dir", str(tmp_path / "runs")] + flags)
    assert needle in str(e.value) and not (tmp_path / "runs").exists()


def test_lora_targets_that_select_nothing_stop_before_the_base_evaluation(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "evaluate_base", lambda *a: pytest.fail("evaluated before checking the targets"))
    with pytest.raises(SystemExit, match="--lora-targets nosuch_proj selects no linear layer"):
        train.main(base_args(tiny_dir, tmp_path, lora_targets="nosuch_proj"))


def test_a_file_where_the_run_folder_goes_is_one_line(tiny_dir, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a run folder"):
        train.main(base_args(tiny_dir, tmp_path))


def test_a_clashing_run_folder_stops_before_the_base_evaluation(tiny_dir, tmp_path, monkeypatch):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "config.json").write_text("{}")
    monkeypatch.setattr(train, "evaluate_base", lambda *a: pytest.fail("evaluated before checking the folder"))
    with pytest.raises(SystemExit, match="already exists"):
        train.main(base_args(tiny_dir, tmp_path))


def test_train_questions_pair_the_sources_and_report_validation_and_familiarity(tiny_dir, tmp_path):
    """With --train-questions, a file: source and human train on the same questions in the file's
    order; each run reports its own validation loss before and after, the size of the LoRA
    update, and the file source's perplexity beside the human answers' on the same questions."""
    import tasks
    pool = tasks.training_pool("gsm8k")
    picked = [pool[i] for i in (5, 60, 2, 31, 8, 13)]
    rows = [{"question": e.question + "\n\nPlease provide the final answer (a number) at the end, after 'Final Answer:'",
             "input": "", "answer": f"It is {e.gold}.\nFinal Answer: {e.gold}"} for e in picked]
    qfile = tmp_path / "paper.json"
    qfile.write_text(json.dumps(rows))
    args = base_args(tiny_dir, tmp_path, n_train=4, train_questions=qfile)
    args[args.index("--source") + 1:args.index("--source") + 2] = ["human", f"file:{qfile}"]
    args = [a for a in args if a not in ("--run-name", "r")]
    train.main(args)
    human = json.loads((tmp_path / "runs" / f"gsm8k-human-{tiny_dir.name}-s0" / "results.json").read_text())
    mine, = [json.loads((p / "results.json").read_text()) for p in (tmp_path / "runs").glob("gsm8k-file_*")]
    for r in (human, mine):
        ids = [e["id"] for e in json.loads((Path(r["run_dir"]) / "perplexity.json").read_text())["per_example"]]
        assert ids == [e.id for e in picked[:4]]
        v = r["validation_loss"]
        assert v["n"] == 2 and v["before"] > 0 and isinstance(v["learned"], bool)
        assert 0 < r["lora_update"]["mean_ratio"] <= r["lora_update"]["max_ratio"] and r["lora_update"]["layers"] == 4
    # the file's own answers to the validation questions (its 5th and 6th) gave its validation loss
    metrics = [json.loads(x) for x in (Path(mine["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["epoch"] == 0 and metrics[0]["val_loss"] == pytest.approx(mine["validation_loss"]["before"])
    h = mine["perplexity_human"]
    assert h["n"] == 4 and h["mean_ppl"] == pytest.approx(human["perplexity"]["mean_ppl"], rel=1e-5)
    assert h["same_text"] == 0 and "perplexity_human" not in human  # the file never copies the human text


def test_a_killed_base_evaluation_keeps_the_tasks_it_finished(tiny_dir, tmp_path, monkeypatch):
    scored = []

    def score(model, args, ctx, tasks_, folder, label):
        if tasks_ == ["csqa"] and not scored.count("csqa-failed"):
            scored.append("csqa-failed")
            raise KeyboardInterrupt  # the session ends during the second task
        scored.extend(tasks_)
        return {t: {"accuracy": 0.25} for t in tasks_}
    monkeypatch.setattr(train, "score_tasks", score)
    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(lambda cls, *a, **k: torch.nn.Module()))
    args = train.parse_args(base_args(tiny_dir, tmp_path))
    args.eval_tasks = ["gsm8k", "csqa"]
    ctx = train.Context(tmp_path / "m", None, 0, 1, "cpu")
    with pytest.raises(KeyboardInterrupt):
        train.evaluate_base(args, ctx)
    assert train.evaluate_base(args, ctx)[0] == {"gsm8k": {"accuracy": 0.25}, "csqa": {"accuracy": 0.25}}
    assert scored == ["gsm8k", "csqa-failed", "csqa"]  # gsm8k was not scored a second time


def test_a_run_killed_during_its_tests_keeps_the_tasks_it_finished(tiny_dir, tmp_path, monkeypatch):
    real_evaluate = train.evaluate_task
    scored = []

    def killed_at_csqa(model, tok, task, **k):
        scored.append(task)
        if task == "csqa" and k["records_path"].parent.name == "r":  # the tuned run's, not the untuned model's
            raise KeyboardInterrupt("killed")
        return real_evaluate(model, tok, task, **k)

    args = base_args(tiny_dir, tmp_path, epochs=1) + ["--eval-tasks", "gsm8k", "csqa"]
    monkeypatch.setattr(train, "evaluate_task", killed_at_csqa)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    run = tmp_path / "runs" / "r"
    answers = run / "eval-gsm8k.jsonl"
    assert not (run / "results.json").exists() and answers.is_file()
    # mark every answer correct by hand (the tiny random model solves none): the resumed run's
    # score can only be 1.0 if it read this file back instead of answering again
    rows = [{**json.loads(line), "correct": True} for line in answers.read_text().splitlines()]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored.clear()
    monkeypatch.setattr(train, "evaluate_task", lambda *a, **k: (scored.append(a[2]), real_evaluate(*a, **k))[1])
    train.main(args + ["--resume"])
    results = json.loads((run / "results.json").read_text())
    assert scored == ["csqa"] and results["test"]["gsm8k"]["accuracy"] == 1.0
    assert results["test"]["gsm8k"]["n"] == 2 and results["test"]["csqa"]["n"] == 2

    # answers older than the kept adapter were another adapter's: scored again
    (run / "results.json").unlink()
    adapter_time = (run / "adapter" / "adapter_model.safetensors").stat().st_mtime
    os.utime(answers, (adapter_time - 60, adapter_time - 60))
    scored.clear()
    train.main(args + ["--resume"])
    assert scored == ["gsm8k"]  # (csqa's answers are newer than the adapter: read back)
    assert json.loads((run / "results.json").read_text())["test"]["gsm8k"]["accuracy"] == 0.0
