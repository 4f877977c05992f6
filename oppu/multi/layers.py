"""Multi-user linear layers: one frozen nn.Linear, many users' LoRA / IA3 tensors, a slot per batch row.

A `MultiUserLinear` replaces a target nn.Linear of the shared base (the original module is kept
as `.base_layer` and put back by `unwrap`). It holds "banks": per-user tensors stacked on a
leading slot axis, and reads from a shared `RowContext` which slot each batch row uses. Slot 0
of every bank is "no adapter" (LoRA zeros, IA3 ones), so a row without a user runs the plain
base, bit for bit. Rows gather their own user's tensors and run one batched matmul, so no
Python loop over rows or users, and in training each row's gradient lands only in its own slot.

Shapes (N = batch rows, T = tokens, S = slots incl. slot 0, r = the largest LoRA rank loaded):
  RowContext.lora, .ia3      [N] long     slot of each row in the LoRA / IA3 banks (0 = none)
  lora_A                     [S, r, in]   PEFT's lora_A.weight per slot (rank-padded with zeros)
  lora_B                     [S, out, r]  PEFT's lora_B.weight per slot
  lora_scale                 [S]          lora_alpha / r (or / sqrt(r) for rsLoRA)
  ia3_out                    [S, out]     scales the output (PEFT's k_proj/v_proj, ia3_l [out, 1])
  ia3_in                     [S, in]      scales the input (PEFT's feedforward down_proj, ia3_l [1, in])

The arithmetic follows PEFT's own LoRA / IA3 `Linear.forward` (same order, input cast to the
adapter dtype, result cast back), so one row equals that user's PeftModel run alone.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


class RowContext:
    """Per-forward batch metadata shared by every wrapped layer: the bank slot of each row."""

    def __init__(self) -> None:
        self.lora: torch.Tensor | None = None  # [N] long
        self.ia3: torch.Tensor | None = None   # [N] long

    def clear(self) -> None:
        self.lora = self.ia3 = None


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """PEFT keeps LoRA/IA3 weights in fp32 on fp16/bf16 bases (autocast_adapter_dtype); so do we."""
    return torch.promote_types(weight.dtype, torch.float32) if weight.is_floating_point() else torch.float32


class MultiUserLinear(nn.Module):
    """A frozen nn.Linear plus stacked per-user LoRA and/or IA3 tensors; see the module docstring."""

    def __init__(self, base_layer: nn.Linear, ctx: RowContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "ctx", ctx)  # shared, not a submodule
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.register_buffer("lora_scale", None, persistent=False)
        self.ia3_out: nn.Parameter | None = None
        self.ia3_in: nn.Parameter | None = None

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)  # for code that inspects q_proj.weight.dtype
    bias = property(lambda self: self.base_layer.bias)

    def _new(self, *shape: int, fill: float) -> nn.Parameter:
        w = self.base_layer.weight
        return nn.Parameter(torch.full(shape, fill, dtype=adapter_dtype(w), device=w.device), requires_grad=False)

    def ensure_lora(self, slots: int, rank: int) -> None:
        """Grow the LoRA bank to at least `slots` slots and rank `rank`, keeping what it holds."""
        old_s, old_r = (0, 0) if self.lora_A is None else self.lora_A.shape[:2]
        s, r = max(slots, old_s), max(rank, old_r)
        if (s, r) == (old_s, old_r):
            return
        a, b = self._new(s, r, self.in_features, fill=0.0), self._new(s, self.out_features, r, fill=0.0)
        scale = torch.zeros(s, dtype=a.dtype, device=a.device)
        if self.lora_A is not None:
            a.data[:old_s, :old_r] = self.lora_A.data
            b.data[:old_s, :, :old_r] = self.lora_B.data
            scale[:old_s] = self.lora_scale
        self.lora_A, self.lora_B, self.lora_scale = a, b, scale

    def ensure_ia3(self, slots: int, on_input: bool) -> None:
        """Grow the IA3 bank (input side for PEFT feedforward modules, output side otherwise)."""
        name, dim = ("ia3_in", self.in_features) if on_input else ("ia3_out", self.out_features)
        old = getattr(self, name)
        if old is not None and old.shape[0] >= slots:
            return
        new = self._new(slots, dim, fill=1.0)
        if old is not None:
            new.data[:old.shape[0]] = old.data
        setattr(self, name, new)

    def banks(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name in ("lora_A", "lora_B", "ia3_out", "ia3_in"):
            p = getattr(self, name)
            if p is not None:
                yield name, p

    def reset_slot(self, kind: str, slot: int) -> None:
        """Make `slot` of the `kind` ("lora" or "ia3") bank the identity again (LoRA zeros, IA3 ones).
        The banks number their slots independently: LoRA slot 3 and IA3 slot 3 are different users."""
        with torch.no_grad():
            if kind == "lora" and self.lora_A is not None:
                self.lora_A[slot].zero_()
                self.lora_B[slot].zero_()
                self.lora_scale[slot] = 0.0
            for p in (self.ia3_out, self.ia3_in) if kind == "ia3" else ():
                if p is not None:
                    p[slot].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, ..., in] -> [N, ..., out]
        ctx, n = self.ctx, x.shape[0]
        ia3 = ctx.ia3 if (self.ia3_in is not None or self.ia3_out is not None) else None
        lora = ctx.lora if self.lora_A is not None else None
        for idx in (ia3, lora):
            if idx is not None and idx.shape[0] != n:
                raise ValueError(f"MultiUserLinear got {n} rows but the row context has {idx.shape[0]}; "
                                 "call MultiUserModel.set_rows for this batch first")
        bshape = (n,) + (1,) * (x.dim() - 2) + (-1,)  # broadcast a per-row vector over the token axes
        if ia3 is not None and self.ia3_in is not None:  # PEFT feedforward IA3: scale the input
            h = (x.to(self.ia3_in.dtype) * self.ia3_in.index_select(0, ia3).view(bshape)).to(x.dtype)
        else:
            h = x
        result = self.base_layer(h)
        if ia3 is not None and self.ia3_out is not None:  # PEFT IA3 on k/v: scale the output
            result = (result * self.ia3_out.index_select(0, ia3).view(bshape)).to(result.dtype)
        if lora is not None:
            out_dtype = result.dtype
            xl = x.to(self.lora_A.dtype).reshape(n, -1, x.shape[-1])  # [N, T, in]
            delta = RowLoRA.apply(xl, self.lora_A, self.lora_B, self.lora_scale, lora)  # [N, T, out]
            if result.dtype == delta.dtype:  # nothing saved the base output for backward: add in place
                result = result.add_(delta.view(result.shape))
            else:
                result = (result + delta.view(result.shape)).to(out_dtype)
        return result


class RowLoRA(torch.autograd.Function):
    """delta[n] = (x[n] @ A[s]^T @ B[s]^T) * scale[s] with s = rows[n]: each row through its own slot.

    x [N, T, in], bank_a [S, r, in], bank_b [S, out, r], scale [S], rows [N] -> [N, T, out].
    The forward is PEFT's order (scale last), so inference matches PeftModel. The backward is
    written out because autograd's own (through the gathered [N, ...] copies) picks slow layouts
    for these narrow (rank-r) batched matmuls: it computes g @ B [N, T, out] x [N, out, r] and
    g^T @ xa directly, 3-4x slower on CPU than the transposed products used below, and scales the
    full [N, T, out] gradient where scaling the [N, r, T] one is the same up to rounding. Gradients
    land in the banks' rows of each slot (index_add over rows of the same user). Rows are gathered
    with index_select, 5x faster than advanced indexing on CPU.
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


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def wrap_linear(root: nn.Module, path: str, ctx: RowContext) -> MultiUserLinear:
    """Replace the nn.Linear at `path` (e.g. "model.layers.0.self_attn.q_proj") by a MultiUserLinear."""
    parent, name = _parent(root, path)
    child = getattr(parent, name, None)
    if isinstance(child, MultiUserLinear):
        return child
    if not isinstance(child, nn.Linear):
        raise ValueError(f"cannot wrap {path!r}: expected an nn.Linear, found {type(child).__name__}; "
                         "multi-user LoRA/IA3 supports linear target modules only")
    wrapped = MultiUserLinear(child, ctx)
    setattr(parent, name, wrapped)
    return wrapped


def restore_linear(root: nn.Module, path: str, wrapped: MultiUserLinear) -> None:
    parent, name = _parent(root, path)
    if getattr(parent, name) is not wrapped:
        raise RuntimeError(f"{path!r} was replaced by someone else while wrapped; refusing to overwrite it")
    setattr(parent, name, wrapped.base_layer)
