"""IA3 in the engine: each row's learned rescaling through its own user's slot, PEFT's file layout.

    IA3Layer  the part a MultiUserLinear holds: input scales [S, in] (PEFT feedforward modules,
              e.g. down_proj: ia3_l [1, in]) and/or output scales [S, out] (k_proj, v_proj: [out, 1])
    IA3Bank   the model-level type: PEFT keys <-> slots, option checks, parameters to train

Slot 0 is all ones (the identity). The arithmetic follows PEFT's IA3 `Linear.forward` (input cast
to the adapter dtype, result cast back), so one row equals that user's PeftModel run alone.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from oppu.engine.layers import LayerBank, new_bank, row_shape

PREFIX = "base_model.model."


class IA3Layer(nn.Module):
    """One linear layer's IA3 banks: `inp` [S, in] scales the input, `out` [S, out] the output."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        object.__setattr__(self, "weight_like", base_layer.weight)  # a reference, not a parameter of ours
        self.dims = {"inp": base_layer.in_features, "out": base_layer.out_features}
        self.inp: nn.Parameter | None = None
        self.out: nn.Parameter | None = None

    def ensure(self, slots: int, side: str | None = None) -> None:
        """Grow the bank of `side` ("inp" | "out"; None = every side in use) to `slots` slots."""
        for name in ([side] if side else [n for n in ("inp", "out") if getattr(self, n) is not None]):
            old = getattr(self, name)
            if old is not None and old.shape[0] >= slots:
                continue
            new = new_bank(self.weight_like, slots, self.dims[name], fill=1.0)
            if old is not None:
                new.data[:old.shape[0]] = old.data
            setattr(self, name, new)

    def reset(self, slot: int) -> None:
        with torch.no_grad():
            for p in self.banks():
                p[slot].fill_(1.0)

    def banks(self) -> list[nn.Parameter]:
        return [p for p in (self.out, self.inp) if p is not None]

    def pre(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.inp is None:
            return x
        return (x.to(self.inp.dtype) * self.inp.index_select(0, rows).view(row_shape(x))).to(x.dtype)

    def post(self, x: torch.Tensor, result: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.out is None:
            return result
        return (result * self.out.index_select(0, rows).view(row_shape(result))).to(result.dtype)


class IA3Bank(LayerBank):
    """The IA3 type of a MultiUserModel: PEFT's `ia3_l` keys <-> one slot per user."""

    name = "ia3"
    peft_type = "IA3"
    unsupported = ("fan_in_fan_out", "modules_to_save")

    @staticmethod
    def check(config) -> None:
        pass

    def put(self, slot: int, config, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        bad = [k for k in state if not k.endswith(".ia3_l")]
        if bad or not state:
            raise ValueError(f"IA3 state has unexpected keys {bad[:4]}; expected '{PREFIX}<module>.ia3_l'")
        sides = {}
        for key, v in state.items():
            path = key[len(PREFIX):-len(".ia3_l")]
            w = self.mm.layer(path)
            if "ia3" not in w.parts:
                w.parts["ia3"] = IA3Layer(w.base_layer)
            part = w.parts["ia3"]
            side = "inp" if v.shape[0] == 1 and v.shape[1] == w.in_features else "out"  # [1, in] | [out, 1]
            if side == "out" and tuple(v.shape) != (w.out_features, 1):
                raise ValueError(f"IA3 module {path!r}: ia3_l {tuple(v.shape)} fits neither [1, {w.in_features}] nor "
                                 f"[{w.out_features}, 1] of this base's layer")
            part.ensure(self.mm.capacity(self.name), side)
            with torch.no_grad():
                bank = getattr(part, side)
                bank[slot] = v.flatten().to(bank)
            sides[path] = side
        return sides

    def state(self, slot: int, sides: Mapping[str, str]) -> dict[str, torch.Tensor]:
        out = {}
        for path, side in sides.items():
            v = getattr(self.mm.layers()[path].parts["ia3"], side)[slot].detach().cpu().clone()
            out[f"{PREFIX}{path}.ia3_l"] = v.view(1, -1) if side == "inp" else v.view(-1, 1)
        return out
