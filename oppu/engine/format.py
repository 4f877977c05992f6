"""The PEFT file format and seeded start state: how the engine's adapters meet the outside world.

Adapters are read and written in the standard PEFT layout (adapter_config.json +
adapter_model.safetensors), so `PeftModel.from_pretrained(base, dir)` loads what the engine
trains and the engine serves what PEFT trains. A user's fresh module starts from the tensors
PEFT's `get_peft_model` creates under a seed derived from (seed, user id), so the start state does
not depend on which users were trained before or beside it.

    pcfg = peft_config("lora", UserTrainConfig())
    config, state = initial_module(base, pcfg, seed=0, user_id="u1")
    write_adapter("out/u1", config, state)
    config, state = read_adapter("out/u1")              # checked: the engine can run it
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Mapping

import torch

from oppu.config import PEFT_TYPES
from oppu.engine.kinds import kind_of

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def user_seed(seed: int, user_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{user_id}".encode()).digest()[:4], "little")


def split_targets(target_modules: str) -> str | list[str]:
    if target_modules == "all-linear":
        return target_modules
    return [m.strip() for m in target_modules.split(",") if m.strip()]


def layer_choice(top_layers: int, n_layers: int | None, target_modules) -> dict:
    """PEFT's `layers_to_transform` for "the last `top_layers` decoder layers" (0 = every layer).
    Backpropagation then stops at the lowest adapted layer: the frozen layers below it need no
    input gradients, which is most of the per-user training cost of a deep base."""
    if not top_layers:
        return {}
    if top_layers < 0:
        raise ValueError(f"top_layers must be >= 0 (0 = all layers), got {top_layers}")
    if n_layers is None:
        raise ValueError("top_layers needs the base's number of decoder layers (pass n_layers)")
    if isinstance(target_modules, str):
        raise ValueError(f"top_layers={top_layers} needs an explicit target_modules list, not "
                         f"{target_modules!r} (e.g. 'q_proj,v_proj')")
    return {"layers_to_transform": list(range(max(0, n_layers - top_layers), n_layers))}


def n_layers_of(base) -> int | None:
    """The number of decoder layers of a transformers causal LM (None when its config has none)."""
    return getattr(getattr(base, "config", None), "num_hidden_layers", None)


def peft_config(kind: str, ucfg, n_layers: int | None = None):
    """The PEFT config of one user's module from the run's UserTrainConfig (`n_layers`: the base's
    decoder depth, needed when ucfg.top_layers restricts the module to the last layers)."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    top = getattr(ucfg, "top_layers", 0)
    if kind == "lora":
        targets = split_targets(ucfg.target_modules)
        return LoraConfig(r=ucfg.lora_r, lora_alpha=ucfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                          task_type="CAUSAL_LM", **layer_choice(top, n_layers, targets))
    if kind == "ia3":
        # IA3 scales keys, values and the MLP's down-projection input (the paper's and PEFT's default).
        targets, ff = ["k_proj", "v_proj", "down_proj"], ["down_proj"]
        layers = layer_choice(top, n_layers, targets).get("layers_to_transform")
        if layers:  # IA3Config has no layers_to_transform: the same choice as full-match patterns
            at = rf".*\.layers\.({'|'.join(map(str, layers))})\.[^.]+\."
            targets, ff = at + "(k_proj|v_proj|down_proj)", at + "down_proj"
        return IA3Config(target_modules=targets, feedforward_modules=ff, task_type="CAUSAL_LM")
    if kind == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=ucfg.num_virtual_tokens, task_type="CAUSAL_LM")
    raise ValueError(f"unknown PEFT type {kind!r}; valid: {', '.join(PEFT_TYPES)}")


def initial_module(base, pcfg, seed: int, user_id: str) -> tuple[object, dict[str, torch.Tensor]]:
    """(config, state) of the fresh module PEFT builds for this user under user_seed(seed, user_id).
    The base is left exactly as it was (PEFT's layers taken out again)."""
    from peft import get_peft_model, get_peft_model_state_dict

    kind_of(pcfg)
    grad_flags = {n: p.requires_grad for n, p in base.named_parameters()}
    torch.manual_seed(user_seed(seed, user_id))
    pm = get_peft_model(base, copy.deepcopy(pcfg))
    try:
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
        config = copy.deepcopy(pm.peft_config["default"])
    finally:
        restored = pm.get_base_model() if config_is_prompt(pm) else pm.unload()
        if hasattr(restored, "disable_input_require_grads"):  # PEFT leaves an embedding hook behind
            restored.disable_input_require_grads()
        for n, p in base.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
    return config, state


def config_is_prompt(pm) -> bool:
    return bool(pm.peft_config["default"].is_prompt_learning)


def read_config(user_dir: str | Path):
    """The PeftConfig saved in user_dir, checked to be a type and options the engine runs."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    d = Path(user_dir)
    if not (d / CONFIG_FILE).exists():
        raise FileNotFoundError(f"no adapter at {d} ({CONFIG_FILE} missing)")
    try:
        peft_type = json.loads((d / CONFIG_FILE).read_text()).get("peft_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{d / CONFIG_FILE} is not a JSON object: {e}") from None
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"{d}: unknown peft_type {peft_type!r}")
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(str(d))
    kind_of(config)
    return config


def read_adapter(user_dir: str | Path):
    """(PeftConfig, state dict) of a saved PEFT adapter, keys as PEFT writes them."""
    from safetensors.torch import load_file

    d = Path(user_dir)
    config = read_config(d)
    if not (d / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {d}; only the safetensors format is read")
    return config, load_file(str(d / WEIGHTS_FILE))


def write_adapter(out_dir: str | Path, config, state: Mapping[str, torch.Tensor], base_name: str | None = None) -> Path:
    """Write a module as PEFT does: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(config)
    cfg.inference_mode = True
    if cfg.base_model_name_or_path is None and base_name:
        cfg.base_model_name_or_path = base_name
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    cfg.save_pretrained(str(out))
    return out
