"""LoRA in the engine: each row's low-rank delta through its own user's slot, PEFT's file layout.

    LoRALayer  the part a MultiUserLinear holds: stacked A [S, r, in], B [S, out, r], scale [S]
    RowLoRA    delta[n] = (x[n] @ A[s]^T @ B[s]^T) * scale[s], s = rows[n], with a fast backward
    LoRABank   the model-level type: PEFT keys <-> slots, option checks, parameters to train

The arithmetic follows PEFT's LoRA `Linear.forward` (input cast to the adapter dtype, scale last,
result cast back), so one row equals that user's PeftModel run alone. Ranks may differ per user:
the bank is padded to the largest rank with zeros, which add nothing.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from oppu.engine.layers import LayerBank, new_bank

PREFIX = "base_model.model."


def lora_scale(config, r: int) -> float:
    """What PEFT multiplies a rank-r LoRA delta B @ A by: lora_alpha / r (rsLoRA: / sqrt(r))."""
    return config.lora_alpha / (r ** 0.5 if config.use_rslora else r)


class RowLoRA(torch.autograd.Function):
    """delta[n] = (x[n] @ A[s]^T @ B[s]^T) * scale[s] with s = rows[n]: each row through its own slot.

    x [N, T, in], bank_a [S, r, in], bank_b [S, out, r], scale [S], rows [N] -> [N, T, out].
    The backward is written out because autograd's own (through the gathered [N, ...] copies)
    picks slow layouts for these narrow (rank-r) batched matmuls: it computes g @ B [N, T, out] x
    [N, out, r] and g^T @ xa directly, 3-4x slower on CPU than the transposed products used below,
    and scales the full [N, T, out] gradient where scaling the [N, r, T] one is the same up to
    rounding. Gradients land in the banks' rows of each slot (index_add over rows of the same
    user). Rows are gathered with index_select, 5x faster than advanced indexing on CPU.
    """

    @staticmethod
    def forward(ctx, x, bank_a, bank_b, scale, rows):
        a, b = bank_a.index_select(0, rows), bank_b.index_select(0, rows)  # [N, r, in], [N, out, r]
        xa = torch.bmm(x, a.transpose(1, 2))                          # [N, T, r]
        s = scale[rows].view(-1, 1, 1)
        ctx.save_for_backward(x, a, b, xa, s, rows)
        ctx.slots = bank_a.shape[0]
        return torch.bmm(xa, b.transpose(1, 2)) * s

    @staticmethod
    def backward(ctx, g):                                             # g [N, T, out]
        x, a, b, xa, s, rows = ctx.saved_tensors
        g = g.to(b.dtype)
        gxa_t = torch.bmm(b.transpose(1, 2), g.transpose(1, 2)) * s  # [N, r, T]: (g @ B)^T, scaled
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(gxa_t.transpose(1, 2), a)               # [N, T, in]
        if ctx.needs_input_grad[1]:
            rows_a = torch.bmm(gxa_t, x)                               # [N, r, in]
            grad_a = torch.zeros((ctx.slots,) + a.shape[1:], dtype=a.dtype, device=a.device)
            grad_a.index_add_(0, rows, rows_a)
        if ctx.needs_input_grad[2]:
            rows_b = torch.bmm((xa * s).transpose(1, 2), g)            # [N, r, out]: (g^T @ xa)^T, scaled
            grad_b = torch.zeros((ctx.slots, b.shape[2], b.shape[1]), dtype=b.dtype, device=b.device)
            grad_b = grad_b.index_add_(0, rows, rows_b).transpose(1, 2)  # summed in [S, r, out], 10x faster
        return grad_x, grad_a, grad_b, None, None


class LoRALayer(nn.Module):
    """One linear layer's LoRA bank: A [S, r, in], B [S, out, r], scale [S] (lora_alpha / r)."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        object.__setattr__(self, "weight_like", base_layer.weight)  # a reference, not a parameter of ours
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.A: nn.Parameter | None = None
        self.B: nn.Parameter | None = None
        self.register_buffer("scale", None, persistent=False)

    def ensure(self, slots: int, rank: int = 0) -> None:
        """Grow to at least `slots` slots and rank `rank`, keeping what the bank holds."""
        old_s, old_r = (0, 0) if self.A is None else self.A.shape[:2]
        s, r = max(slots, old_s), max(rank, old_r)
        if (s, r) == (old_s, old_r):
            return
        a = new_bank(self.weight_like, s, r, self.in_features, fill=0.0)
        b = new_bank(self.weight_like, s, self.out_features, r, fill=0.0)
        scale = torch.zeros(s, dtype=a.dtype, device=a.device)
        if self.A is not None:
            a.data[:old_s, :old_r] = self.A.data
            b.data[:old_s, :, :old_r] = self.B.data
            scale[:old_s] = self.scale
        self.A, self.B, self.scale = a, b, scale

    def reset(self, slot: int) -> None:
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.scale[slot] = 0.0

    def banks(self) -> list[nn.Parameter]:
        return [self.A, self.B]

    def pre(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return x

    def post(self, x: torch.Tensor, result: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        xl = x.to(self.A.dtype).reshape(n, -1, x.shape[-1])                # [N, T, in]
        delta = RowLoRA.apply(xl, self.A, self.B, self.scale, rows)       # [N, T, out]
        if result.dtype == delta.dtype:  # nothing saved the base output for backward: add in place
            return result.add_(delta.view(result.shape))
        return (result + delta.view(result.shape)).to(result.dtype)


class LoRABank(LayerBank):
    """The LoRA type of a MultiUserModel: PEFT's lora_A/lora_B keys <-> one slot per user."""

    name = "lora"
    peft_type = "LORA"
    # options whose presence changes the math; refused rather than silently ignored
    unsupported = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "alpha_pattern",
                   "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
                   "use_bdlora", "arrow_config", "alora_invocation_tokens")

    @staticmethod
    def check(config) -> None:
        if getattr(config, "lora_dropout", 0.0):
            raise ValueError(f"LORA option lora_dropout={config.lora_dropout} is not supported by the engine "
                             "(batched rows would need per-user dropout streams); use 0.0")

    def put(self, slot: int, config, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        paths = sorted(k[len(PREFIX):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))
        if not paths or len(state) != 2 * len(paths):
            raise ValueError(f"LoRA state has keys {sorted(state)[:4]}...; expected only "
                             f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight' pairs")
        ranks = {}
        for path in paths:
            a, b = state[f"{PREFIX}{path}.lora_A.weight"], state[f"{PREFIX}{path}.lora_B.weight"]
            r = a.shape[0]
            w = self.mm.layer(path)
            if tuple(a.shape) != (r, w.in_features) or tuple(b.shape) != (w.out_features, r):
                raise ValueError(f"LoRA module {path!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                                 f"this base's layer ({w.out_features} x {w.in_features})")
            if "lora" not in w.parts:
                w.parts["lora"] = LoRALayer(w.base_layer)
            part = w.parts["lora"]
            part.ensure(self.mm.capacity(self.name), r)
            with torch.no_grad():
                part.A[slot, :r] = a.to(part.A)
                part.B[slot, :, :r] = b.to(part.B)
            part.scale[slot] = lora_scale(config, r)
            ranks[path] = r
        return ranks

    def state(self, slot: int, ranks: Mapping[str, int]) -> dict[str, torch.Tensor]:
        out = {}
        for path, r in ranks.items():
            part = self.mm.layers()[path].parts["lora"]
            out[f"{PREFIX}{path}.lora_A.weight"] = part.A[slot, :r].detach().cpu().clone()
            out[f"{PREFIX}{path}.lora_B.weight"] = part.B[slot, :, :r].detach().cpu().clone()
        return out
