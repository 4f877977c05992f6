"""The registry of PEFT types the engine runs: one bank class per type, one file per type.

A bank class has `name` (oppu's choice name), `peft_type` (PEFT's), `unsupported` (config options
whose presence changes the math: refused, never silently ignored), a static `check(config)` for
the rest, and, per MultiUserModel, grow/reset/put/state/params/prepare (see engine/model.py).
A fourth type is one new file and one entry below (and its name in oppu.config.PEFT_TYPES).

    kind_of(LoraConfig(r=8, lora_dropout=0.1))   # ValueError naming lora_dropout
"""
from __future__ import annotations

from oppu.engine.ia3 import IA3Bank
from oppu.engine.lora import LoRABank
from oppu.engine.prompt_tuning import PromptBank

BANKS = {b.name: b for b in (LoRABank, IA3Bank, PromptBank)}
BY_PEFT_TYPE = {b.peft_type: b.name for b in BANKS.values()}


def kind_of(config) -> str:
    """The engine's type name for a PEFT config, or ValueError naming what the engine cannot run."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    name = BY_PEFT_TYPE.get(peft_type)
    if name is None:
        raise ValueError(f"unsupported PEFT type {peft_type!r}; valid: {', '.join(BY_PEFT_TYPE)}")
    bank = BANKS[name]
    for opt in bank.unsupported:
        if getattr(config, opt, None):
            raise ValueError(f"{peft_type} option {opt}={getattr(config, opt)!r} is not supported by the engine; "
                             "save the adapter without it")
    bank.check(config)
    return name
