"""LoRA (Hu et al., 2021) as the paper uses it: low-rank adapters on q_proj and v_proj, rank 8,
alpha 16, dropout 0, with the base model frozen (paper section 3, "training details").

A frozen linear layer W0 gets a trainable low-rank update: y = W0 x + (alpha / r) * B A x, with
A (r, in) drawn Kaiming-uniform and B (out, r) zeros, so training starts from the base model
exactly. This file holds:

- `LoRALinear(base)`: the wrapper, by composition (`self.base` is the untouched `nn.Linear`), with
  an explicit `merge()` / `unmerge()` that folds the update into the base weight for inference.
- `inject_lora(model, targets)`: replace every `nn.Linear` whose name ends in a target
  (`q_proj`, ...) or, for "all-linear", every `nn.Linear` inside the decoder layers; freeze the rest.
- `save_adapter` / `load_adapter`: PEFT's on-disk format (`adapter_config.json` +
  `adapter_model.safetensors`, keys like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`),
  so an adapter trained here loads into HF transformers + PEFT and the other way round.

Deviations from PEFT, all deliberate:
- One adapter per layer, no adapter names, no DoRA / rsLoRA / rank patterns / bias training /
  `modules_to_save`. An adapter_config.json that asks for any of these is refused, not half-loaded.
- `merge()` is only ever called explicitly; `.eval()` never merges (PEFT does not either, but
  some LoRA code does, and then a later `.train()` silently trains a merged model).
- The LoRA parameters always live in fp32, whatever the base dtype (PEFT does the same by default
  via `autocast_adapter_dtype`; here it is not optional). See `LoRALinear.forward` for why.

Run `python lora.py MODEL_FOLDER` to see which modules LoRA targets and how many parameters train.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fileio import replacing_folder
from model import ModelLoadError, Transformer
from pretrained import resolve_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel wraps the causal LM as `base_model` (the LoraModel) `.model` (the LlamaForCausalLM), so
# every saved key starts with this before the module names that our Transformer shares with HF.
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter folder we cannot load; the message names the problem and the fix."""


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters; the defaults are the paper's."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    # module-name suffixes (PEFT's list semantics), or "all-linear" (every nn.Linear in the layers)
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not math.isfinite(self.alpha):  # nan or inf would make every update nan
            raise ValueError(f"LoRA alpha must be a finite number, got {self.alpha}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


# ----------------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-r update: base(x) + scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        out_features, in_features = base.weight.shape
        # PEFT's init: A ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0, so
        # the update B A is exactly zero and the wrapped model starts as the base model.
        # Drawn on the CPU so that a seeded CPU generator gives the same A on every device.
        A = torch.empty(r, in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        device = base.weight.device
        self.lora_A = nn.Parameter(A.to(device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=torch.float32, device=device))  # (out, r)
        # Identity when p == 0 (as PEFT), so the paper's setting costs nothing.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = self.base(x)  # (..., out) in the base dtype
        if self.merged:  # B A is already inside base.weight; adding it again would double it
            return y
        # The LoRA weights stay fp32 even over a bf16 base: B starts at zero and AdamW's steps
        # (lr ~1e-4) are far below bf16's ~3 significant digits relative to the weight, so in
        # bf16 most updates would round away. The branch is tiny (rank 8), so fp32 costs little.
        h = self.dropout(x.to(self.lora_A.dtype))  # (..., in) fp32
        h = h @ self.lora_A.T  # (..., r)
        h = h @ self.lora_B.T  # (..., out)
        return y + (h * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update scale * B @ A, (out, in), in fp32."""
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self):
        """Fold the update into base.weight (for fast inference); the forward then skips the branch."""
        if self.merged:
            raise RuntimeError("LoRA layer is already merged; call unmerge() first")
        w = self.base.weight
        # add in fp32 then round once: adding to a bf16 weight in bf16 would round B A first
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract the update again. Exact up to rounding: in bf16 the restored weight can differ
        from the original in the last bit, so keep the original checkpoint for anything exact."""
        if not self.merged:
            raise RuntimeError("LoRA layer is not merged; nothing to unmerge")
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------
# Injection


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a list matches a name equal to or ending in '.<target>'; a string is a regex
    that must match the whole name ("all-linear" is handled by the caller)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def target_module_names(model: nn.Module, targets: list[str] | tuple[str, ...] | str) -> list[str]:
    """Names of the `nn.Linear` modules that `targets` selects, in model order."""
    if isinstance(targets, str) and targets.lower() == "all-linear":
        # As PEFT: every linear layer except the output head. Ours are the ones in model.layers.
        return [n for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    targets = targets if isinstance(targets, str) else list(targets)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]


def inject_lora(model: nn.Module, targets: list[str] | tuple[str, ...] | str = ("q_proj", "v_proj"),
                r: int = 8, alpha: float = 16, dropout: float = 0.0,
                seed: int | None = None) -> list[str]:
    """Wrap each targeted `nn.Linear` in a `LoRALinear`, freeze everything else, and return the
    wrapped module names. `seed` makes the A matrices reproducible (None: the global RNG)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers; inject into a fresh model")
    names = target_module_names(model, targets)
    if not names:
        raise ValueError(f"no nn.Linear module matches LoRA targets {targets!r} "
                         f"(module names look like 'model.layers.0.self_attn.q_proj')")
    # A weight shared with another module (the tied lm_head / embedding) would be changed for
    # both by merge(); refuse rather than corrupt the embedding.
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for name in names:  # checked before changing anything, so a refusal leaves the model intact
        if uses[id(model.get_submodule(name).weight)] > 1:
            raise ValueError(f"'{name}' shares its weight with another module (tied embeddings); "
                             f"LoRA on it is not supported, leave it out of the targets")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(base, r, alpha, dropout, generator))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


@torch.no_grad()
def update_ratios(model: nn.Module) -> dict[str, float]:
    """How far training moved each adapted layer: ||scale * B A||_F / ||W||_F (W the frozen base
    weight), by module name. ~1e-4 means the tuned model is, for practical purposes, the base."""
    ratios = {}
    for name, m in lora_layers(model).items():
        w = m.base.weight.float()
        if m.merged:  # W already holds W + B A
            w = w - m.delta_weight()
        ratios[name] = float(m.delta_weight().norm() / w.norm())
    return ratios


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())  # parameters() already drops duplicates (tied weights)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def print_trainable_parameters(model: nn.Module) -> None:
    print(parameter_summary(model))


# ----------------------------------------------------------------------------------------------
# Saving and loading in PEFT's format


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights under PEFT's key names, as CPU fp32 copies."""
    state = {}
    for name, m in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    return state


def peft_config_dict(config: LoRAConfig, base_model_name: str) -> dict:
    """adapter_config.json with PEFT's keys; the ones we do not support carry PEFT's defaults."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets,
        "exclude_modules": None,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "auto_mapping": None,
    }


def save_adapter(model: nn.Module, folder: str | os.PathLike, config: LoRAConfig,
                 base_model_name: str) -> None:
    """Write adapter_config.json + adapter_model.safetensors into `folder`, replacing it whole.

    The files go to a temporary sibling folder first, which then takes the final name whole
    (fileio.replacing_folder), so a crash never leaves a folder holding a new config with old weights.
    """
    state = lora_state_dict(model)
    if not state:
        raise ValueError("model has no LoRA layers to save; call inject_lora first")
    with replacing_folder(folder) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config_dict(config, base_model_name), indent=2) + "\n")
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})


# PEFT features this file does not implement, with the value that means "off".
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                "lora_bias": False, "modules_to_save": None, "layers_to_transform": None,
                "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
                "trainable_token_indices": None, "target_parameters": None,
                "layer_replication": None, "use_qalora": False, "alora_invocation_tokens": None}
_FALSY = (None, False, [], {})


def read_adapter_config(folder: str | os.PathLike) -> LoRAConfig:
    """Parse a PEFT adapter_config.json, refusing any feature we would silently ignore."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"no {ADAPTER_CONFIG} in {folder}: pass a folder written by "
                           f"save_adapter or PEFT's save_pretrained")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path} is not valid JSON ({e})") from None
    if d.get("peft_type") != "LORA":
        raise AdapterError(f"{path} has peft_type={d.get('peft_type')!r}; only LORA adapters are supported")
    for key, off in _UNSUPPORTED.items():
        value = d.get(key, off)
        if value != off and not (value in _FALSY and off in _FALSY):  # null, [] and {} all mean off
            raise AdapterError(f"{path} sets {key}={value!r}, which this LoRA implementation "
                               f"does not support (it needs {key}={off!r})")
    try:
        targets = d["target_modules"]
        return LoRAConfig(r=int(d["r"]), alpha=d["lora_alpha"], dropout=float(d.get("lora_dropout", 0.0)),
                          targets=targets if isinstance(targets, str) else list(targets))
    except KeyError as e:
        raise AdapterError(f"{path} lacks the required field {e}") from None
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from None


def load_adapter_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy adapter_model.safetensors into the model's LoRA layers, strictly: every LoRA tensor
    must be in the file with the right shape, and the file must hold nothing else."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"no {ADAPTER_WEIGHTS} in {folder} (PEFT's older adapter_model.bin is "
                           f"not supported: re-save it with safe_serialization=True)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"cannot read {path} (truncated or corrupt?): {e}") from None
    layers = lora_layers(model)
    if any(m.merged for m in layers.values()):
        raise AdapterError("cannot load adapter weights into a merged model; call unmerge_lora first")
    expected = {}
    for name, m in layers.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise AdapterError(f"adapter {path} is missing tensor '{missing[0]}'"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise AdapterError(f"adapter {path} has unexpected tensor '{unexpected[0]}'"
                           + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                           + ": its target_modules do not match its weights, or it is for another model")
    for key, p in expected.items():
        if tuple(state[key].shape) != tuple(p.shape):
            raise AdapterError(f"adapter tensor '{key}' has shape {tuple(state[key].shape)}, the "
                               f"model expects {tuple(p.shape)} (another rank or base model?)")
    with torch.no_grad():
        for key, p in expected.items():
            p.copy_(state[key].to(p.dtype))  # keeps the fp32 LoRA dtype and the model's device


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> LoRAConfig:
    """Inject LoRA as the folder's config says (or check a model that already has it), then load
    the weights strictly. Returns the adapter's config."""
    config = read_adapter_config(folder)
    existing = lora_layers(model)
    if existing:
        wanted = _lora_names_matching(model, config.targets)
        same_shape = all((m.r, m.alpha) == (config.r, config.alpha) for m in existing.values())
        if sorted(existing) != sorted(wanted) or not same_shape:
            raise AdapterError(f"model already has LoRA layers that differ from the adapter in "
                               f"{folder}; load it into a fresh model")
    else:
        inject_lora(model, config.targets, config.r, config.alpha, config.dropout)
    load_adapter_weights(model, folder)
    return config


def _lora_names_matching(model: nn.Module, targets: list[str] | str) -> list[str]:
    """What `targets` selects on a model that may already hold LoRA layers: the LoRA layers and
    the plain linear layers (not a LoRA layer's own `.base`) it would wrap."""
    bases = {id(m.base) for m in lora_layers(model).values()}
    names = [n for n, m in model.named_modules()
             if isinstance(m, LoRALinear) or (isinstance(m, nn.Linear) and id(m) not in bases)]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return [n for n in names if n.startswith("model.layers.")]
    return [n for n in names if _matches(n, targets)]


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description="Show which modules LoRA targets and how many parameters train.")
    ap.add_argument("model", help="an HF-format model folder (or a packaged model's short name)")
    ap.add_argument("--adapter", default=None, help="an adapter folder to load instead of a fresh LoRA")
    ap.add_argument("--targets", default="q_proj,v_proj",
                    help="comma-separated module-name suffixes, or all-linear (paper: q_proj,v_proj)")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (paper: 8)")
    ap.add_argument("--alpha", type=float, default=16, help="LoRA alpha; the update is scaled by alpha/r (paper: 16)")
    args = ap.parse_args(argv)

    folder = args.model
    if not Path(folder).is_dir():
        try:
            folder = resolve_model(folder)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: '{args.model}' is not a model folder and not a packaged model ({e})")
    try:
        model = Transformer.from_pretrained(folder, "fp32")
        if args.adapter:
            config = load_adapter(model, args.adapter)
        else:
            targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
            config = LoRAConfig(args.r, args.alpha, 0.0, targets)
            inject_lora(model, config.targets, config.r, config.alpha, config.dropout, seed=0)
    except (ModelLoadError, AdapterError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(asdict(config)))
    for name in lora_layers(model):
        print(name)
    print_trainable_parameters(model)


if __name__ == "__main__":
    main()
