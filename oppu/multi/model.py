"""MultiUserModel: the shared frozen base with many users' PEFT modules loaded side by side.

Every loaded user owns one slot in the bank of its PEFT type (LoRA, IA3, prompt tuning; each
type numbers its slots on its own, slot 0 = no adapter); a batch names one user (or None =
plain base) per row, and each row is computed with its own module only, so users of different
types, ranks, alphas, target modules or virtual-token counts can share one batch. Users are read
from and written to the standard PEFT format (adapter_config.json + adapter_model.safetensors),
so `PeftModel.from_pretrained` and this class share adapters. Banks grow as users are loaded
(`reserve` sizes them up front, as training does so its optimizer keeps the same tensors).

    with MultiUserModel(base) as mm:                      # wraps target linears; unwraps on exit
        mm.load_users({"u1": "adapters/u1", "u2": "adapters/u2"})
        inputs = mm.prepare(input_ids, attention_mask, users=["u1", None, "u2"])
        logits = base(**inputs).logits                    # row i used users[i]'s module
        mm.save_user("u1", "out/u1")                      # PeftModel.from_pretrained-loadable

Shapes: input_ids/attention_mask [N, T] (left or right padded); `prepare` returns
attention_mask/position_ids [N, P + T] and, when a row uses prompt tuning, inputs_embeds
[N, P + T, H] with P = the longest virtual prompt among the batch's users. Prompt-tuning bank:
pt_emb [S, P_max, H], each user's virtual tokens right-aligned (pt_len [S]); a row's unused
virtual positions (all P of them for a row without prompt tuning) are masked out, and
position ids count only unmasked tokens (cumsum of the mask), so each row sees exactly what
PEFT feeds that user alone on an unpadded prompt: [virtual tokens][prompt], positions 0..P_u+T_u-1.
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from oppu.multi.layers import MultiUserLinear, RowContext, adapter_dtype, restore_linear, wrap_linear

KINDS = ("lora", "ia3", "prompt_tuning")
_PEFT_TYPE = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning"}
_PREFIX = "base_model.model."
# Config options whose presence changes the math; refused rather than silently ignored.
_UNSUPPORTED = {"lora": ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "alpha_pattern",
                         "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
                         "use_bdlora", "arrow_config", "alora_invocation_tokens"),
                "ia3": ("fan_in_fan_out", "modules_to_save"),
                "prompt_tuning": ("modules_to_save",)}


@dataclass
class _User:
    kind: str
    slot: int
    config: object                                   # the user's PeftConfig
    modules: dict[str, int] = field(default_factory=dict)  # module path -> LoRA rank / IA3 (1 = input side)
    n_virtual: int = 0


def peft_kind(config) -> str:
    kind = _PEFT_TYPE.get(str(getattr(config.peft_type, "value", config.peft_type)))
    if kind is None:
        raise ValueError(f"unsupported PEFT type {config.peft_type!r}; valid: LORA, IA3, PROMPT_TUNING")
    for opt in _UNSUPPORTED[kind]:
        if getattr(config, opt, None):
            raise ValueError(f"{config.peft_type} option {opt}={getattr(config, opt)!r} is not supported by "
                             "multi-user batching; train/serve this user with oppu.adapters instead")
    if kind == "lora" and getattr(config, "lora_dropout", 0.0):
        raise ValueError(f"lora_dropout={config.lora_dropout} is not supported (batched rows would need "
                         "per-user dropout streams); use 0.0")
    if kind == "prompt_tuning" and getattr(config, "num_transformer_submodules", None) not in (None, 1):
        raise ValueError("prompt tuning with num_transformer_submodules != 1 (encoder-decoder) is not supported")
    return kind


def read_adapter(user_dir: str | Path):
    """(PeftConfig, state dict) of a saved PEFT adapter, keys as PEFT writes them."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from safetensors.torch import load_file

    d = Path(user_dir)
    if not (d / "adapter_config.json").exists():
        raise FileNotFoundError(f"no adapter at {d} (adapter_config.json missing)")
    if not (d / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"no adapter_model.safetensors in {d}; only the safetensors format is read")
    peft_type = json.loads((d / "adapter_config.json").read_text()).get("peft_type")
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"{d}: unknown peft_type {peft_type!r}")
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(str(d))
    return config, load_file(str(d / "adapter_model.safetensors"))


class MultiUserModel:
    """See the module docstring. Not an nn.Module: it edits `base` in place and restores it."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        self.ctx = RowContext()
        self.users: dict[str, _User] = {}
        self._cap = {k: 1 for k in KINDS}                # slots per bank, slot 0 = no adapter
        self._free: dict[str, list[int]] = {k: [] for k in KINDS}
        self._wrapped: dict[str, MultiUserLinear] = {}
        self._grad_flags = {n: p.requires_grad for n, p in base.named_parameters()}
        for p in base.parameters():
            p.requires_grad_(False)
        emb = base.get_input_embeddings()
        self.hidden = emb.weight.shape[1]
        self.pt_emb = torch.zeros(1, 0, self.hidden, dtype=adapter_dtype(emb.weight), device=emb.weight.device)
        self.pt_len = torch.zeros(1, dtype=torch.long, device=emb.weight.device)
        self._open = True

    # ---- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "MultiUserModel":
        return self

    def __exit__(self, *exc) -> None:
        self.unwrap()

    def unwrap(self) -> None:
        """Put the base's original modules and requires_grad flags back; this object is spent."""
        if not self._open:
            return
        for path, w in self._wrapped.items():
            restore_linear(self.base, path, w)
        for n, p in self.base.named_parameters():
            p.requires_grad_(self._grad_flags.get(n, p.requires_grad))
        self._wrapped.clear()
        self.users.clear()
        self.ctx.clear()
        self._open = False

    @contextmanager
    def detached(self) -> Iterator[nn.Module]:
        """Temporarily give the base its plain modules back (e.g. to let PEFT build a fresh module)."""
        for path, w in self._wrapped.items():
            restore_linear(self.base, path, w)
        try:
            yield self.base
        finally:
            for path, w in self._wrapped.items():
                parent, _, name = path.rpartition(".")
                setattr(self.base.get_submodule(parent) if parent else self.base, name, w)

    # ---- slots ------------------------------------------------------------------------------
    def reserve(self, kind: str, n_users: int) -> None:
        """Make room for n_users more users of `kind` without growing the banks again later."""
        need = n_users - len(self._free[kind])
        if need > 0:
            self._grow(kind, self._cap[kind] + need)

    def _grow(self, kind: str, slots: int) -> None:
        old = self._cap[kind]
        self._cap[kind] = slots
        self._free[kind].extend(range(old, slots))
        for w in self._wrapped.values():
            if kind == "lora" and w.lora_A is not None:
                w.ensure_lora(slots, 0)
            if kind == "ia3":
                for on_input, p in ((True, w.ia3_in), (False, w.ia3_out)):
                    if p is not None:
                        w.ensure_ia3(slots, on_input)
        if kind == "prompt_tuning":
            self._grow_pt(slots, self.pt_emb.shape[1])

    def _grow_pt(self, slots: int, n_virtual: int) -> None:
        s0, n0 = self.pt_emb.shape[:2]
        s, n = max(slots, s0), max(n_virtual, n0)
        if (s, n) == (s0, n0):
            return
        emb = torch.zeros(s, n, self.hidden, dtype=self.pt_emb.dtype, device=self.pt_emb.device)
        emb[:s0, n - n0:] = self.pt_emb.data  # right-aligned: growing P pads on the left
        length = torch.zeros(s, dtype=torch.long, device=self.pt_len.device)
        length[:s0] = self.pt_len
        self.pt_emb, self.pt_len = nn.Parameter(emb, requires_grad=False), length

    def _take_slot(self, kind: str) -> int:
        if not self._free[kind]:
            self._grow(kind, max(2, 2 * self._cap[kind]))
        return self._free[kind].pop(0)

    def remove_user(self, user_id: str) -> None:
        u = self.users.pop(user_id)
        self._reset_slot(u.kind, u.slot)
        self._free[u.kind].append(u.slot)
        self._free[u.kind].sort()

    def _reset_slot(self, kind: str, slot: int) -> None:
        if kind == "prompt_tuning":
            with torch.no_grad():
                self.pt_emb[slot].zero_()
            self.pt_len[slot] = 0
            return
        for w in self._wrapped.values():
            w.reset_slot(kind, slot)

    # ---- loading and export -----------------------------------------------------------------
    def load_users(self, dirs: Mapping[str, str | Path]) -> None:
        """Load each user's saved PEFT adapter into a slot of its type's bank."""
        for uid, d in dirs.items():
            config, state = read_adapter(d)
            self.add_user(uid, config, state)

    def add_user(self, user_id: str, config, state: Mapping[str, torch.Tensor]) -> int:
        """Load one user's module (PEFT state-dict keys) into a free slot; returns the slot."""
        if user_id in self.users:
            raise ValueError(f"user {user_id!r} is already loaded")
        kind = peft_kind(config)
        slot = self._take_slot(kind)
        user = _User(kind, slot, copy.deepcopy(config))
        self._reset_slot(kind, slot)
        try:
            {"lora": self._put_lora, "ia3": self._put_ia3, "prompt_tuning": self._put_pt}[kind](user, state)
        except Exception:
            self._reset_slot(kind, slot)
            self._free[kind].insert(0, slot)
            raise
        self.users[user_id] = user
        return slot

    def _put_lora(self, user: _User, state: Mapping[str, torch.Tensor]) -> None:
        paths = sorted(k[len(_PREFIX):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))
        if not paths or len(state) != 2 * len(paths):
            raise ValueError(f"LoRA state has keys {sorted(state)[:4]}...; expected only "
                             f"'{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' pairs")
        cfg = user.config
        for path in paths:
            a, b = state[f"{_PREFIX}{path}.lora_A.weight"], state[f"{_PREFIX}{path}.lora_B.weight"]
            r = a.shape[0]
            w = self._wrap(path)
            w.ensure_lora(self._cap["lora"], r)
            with torch.no_grad():
                w.lora_A[user.slot, :r] = a.to(w.lora_A)
                w.lora_B[user.slot, :, :r] = b.to(w.lora_B)
            w.lora_scale[user.slot] = cfg.lora_alpha / (r ** 0.5 if cfg.use_rslora else r)
            user.modules[path] = r

    def _put_ia3(self, user: _User, state: Mapping[str, torch.Tensor]) -> None:
        bad = [k for k in state if not k.endswith(".ia3_l")]
        if bad or not state:
            raise ValueError(f"IA3 state has unexpected keys {bad[:4]}; expected '{_PREFIX}<module>.ia3_l'")
        for key, v in state.items():
            path = key[len(_PREFIX):-len(".ia3_l")]
            w = self._wrap(path)
            on_input = v.shape[0] == 1 and v.shape[1] == w.in_features  # PEFT: [1, in] feedforward, [out, 1]
            w.ensure_ia3(self._cap["ia3"], on_input)
            with torch.no_grad():
                bank = w.ia3_in if on_input else w.ia3_out
                bank[user.slot] = v.flatten().to(bank)
            user.modules[path] = int(on_input)

    def _put_pt(self, user: _User, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != {"prompt_embeddings"}:
            raise ValueError(f"prompt-tuning state has keys {sorted(state)}; expected ['prompt_embeddings']")
        e = state["prompt_embeddings"]
        if e.dim() != 2 or e.shape[1] != self.hidden:
            raise ValueError(f"prompt_embeddings of shape {tuple(e.shape)} do not fit hidden size {self.hidden}")
        self._grow_pt(self._cap["prompt_tuning"], e.shape[0])
        with torch.no_grad():
            self.pt_emb[user.slot, self.pt_emb.shape[1] - e.shape[0]:] = e.to(self.pt_emb)
        self.pt_len[user.slot] = e.shape[0]
        user.n_virtual = e.shape[0]

    def _wrap(self, path: str) -> MultiUserLinear:
        if path not in self._wrapped:
            self._wrapped[path] = wrap_linear(self.base, path, self.ctx)
        return self._wrapped[path]

    def user_state(self, user_id: str) -> dict[str, torch.Tensor]:
        """The user's tensors under PEFT's saved key names and shapes (CPU copies)."""
        u = self.users[user_id]
        if u.kind == "prompt_tuning":
            start = self.pt_emb.shape[1] - u.n_virtual
            return {"prompt_embeddings": self.pt_emb[u.slot, start:].detach().cpu().clone()}
        out = {}
        for path, extra in u.modules.items():
            w = self._wrapped[path]
            if u.kind == "lora":
                out[f"{_PREFIX}{path}.lora_A.weight"] = w.lora_A[u.slot, :extra].detach().cpu().clone()
                out[f"{_PREFIX}{path}.lora_B.weight"] = w.lora_B[u.slot, :, :extra].detach().cpu().clone()
            else:
                v = (w.ia3_in if extra else w.ia3_out)[u.slot].detach().cpu().clone()
                out[f"{_PREFIX}{path}.ia3_l"] = v.view(1, -1) if extra else v.view(-1, 1)
        return out

    def save_user(self, user_id: str, out_dir: str | Path) -> Path:
        """Write the user's module as PEFT does: adapter_config.json + adapter_model.safetensors."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(self.users[user_id].config)
        cfg.inference_mode = True
        if cfg.base_model_name_or_path is None:
            cfg.base_model_name_or_path = self.base.__dict__.get("name_or_path") or None
        save_file({k: v.contiguous() for k, v in self.user_state(user_id).items()},
                  str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(str(out))
        return out

    def bank_params(self, kind: str) -> list[nn.Parameter]:
        """The stacked tensors of one PEFT type, each [S, ...] with the slot axis first."""
        if kind == "prompt_tuning":
            return [self.pt_emb]
        names = {"lora": ("lora_A", "lora_B"), "ia3": ("ia3_out", "ia3_in")}[kind]
        return [p for w in self._wrapped.values() for n, p in w.banks() if n in names]

    # ---- batches ----------------------------------------------------------------------------
    def slots_of(self, users: Sequence[str | None], kind: str) -> torch.Tensor:
        """[N] long: each row's slot in `kind`'s bank (0 for rows of other types or without a user)."""
        unknown = [u for u in users if u is not None and u not in self.users]
        if unknown:
            raise KeyError(f"user(s) {unknown[:5]} not loaded; loaded: {sorted(self.users)[:10]}")
        s = [self.users[u].slot if u is not None and self.users[u].kind == kind else 0 for u in users]
        return torch.tensor(s, dtype=torch.long, device=self.pt_len.device)

    def set_rows(self, users: Sequence[str | None]) -> torch.Tensor:
        """Tell every wrapped layer which user each row belongs to; returns the rows' PT slots [N]."""
        lora, ia3, pt = (self.slots_of(users, k) for k in KINDS)
        self.ctx.lora = lora if bool(lora.any()) else None
        self.ctx.ia3 = ia3 if bool(ia3.any()) else None
        return pt

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                users: Sequence[str | None]) -> dict[str, torch.Tensor]:
        """Model inputs for a fresh (no cache) forward of rows owned by `users`; sets the row context.

        Returns input_ids or inputs_embeds, attention_mask and position_ids, all with P virtual
        positions prepended (P = 0 when no row uses prompt tuning).
        """
        if input_ids.shape[0] != len(users):
            raise ValueError(f"{input_ids.shape[0]} rows but {len(users)} users")
        pt = self.set_rows(users)
        att = attention_mask.to(self.pt_len.device).long()
        n_virtual = int(self.pt_len[pt].max()) if len(users) else 0
        if n_virtual:
            emb = self.base.get_input_embeddings()(input_ids.to(self.pt_len.device))
            virt = self.pt_emb[pt][:, self.pt_emb.shape[1] - n_virtual:]           # [N, P, H]
            vmask = torch.arange(n_virtual, device=att.device) >= (n_virtual - self.pt_len[pt])[:, None]
            att = torch.cat([vmask.long(), att], dim=1)
            inputs = {"inputs_embeds": torch.cat([virt.to(emb.dtype), emb], dim=1)}
        else:
            inputs = {"input_ids": input_ids.to(att.device)}
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        return {**inputs, "attention_mask": att, "position_ids": pos}
