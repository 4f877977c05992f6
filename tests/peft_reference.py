"""The independent reference: the paper's way, through PEFT alone (no oppu.engine code).

One user at a time: a fresh `get_peft_model` under the user's seed, a plain PyTorch loop
(torch.optim.AdamW, HF's own loss over the whole vocabulary at every position, clip per user),
`save_pretrained`; generation through `PeftModel.from_pretrained` + `model.generate`. The
engine's tests compare against these, so a change that moves the engine shows up against code
it does not share (only the data order, `oppu.engine.batching.batches`, and the example encoding
are shared on purpose: they define which examples a step sees, not how it computes).

    losses = peft_train_user(base, tok, examples, pcfg, ucfg, seed, "u1", out_dir, max_len)
    texts = peft_generate(base, tok, prompts, user_dir, max_new_tokens=8)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from oppu.engine.batching import batches, collate, encode, tokenize_prompts
from oppu.engine.format import user_seed


def peft_attach(base, pcfg, seed: int, user_id: str):
    from peft import get_peft_model

    torch.manual_seed(user_seed(seed, user_id))
    return get_peft_model(base, pcfg)


def peft_detach(pm):
    prompt = pm.peft_config["default"].is_prompt_learning
    base = pm.get_base_model() if prompt else pm.unload()
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()
    return base


def _lr(step: int, total: int, lr: float, ratio: float) -> float:
    warmup = max(1, int(total * ratio)) if ratio > 0 else 0
    if not warmup:
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def peft_train_user(base, tok, examples, pcfg, ucfg, seed: int, user_id: str, save_dir: str | Path | None,
                    max_len: int, start_dir: str | Path | None = None, order_seed: int | None = None) -> list[float]:
    """Train one user's PEFT module the plain way; returns per-epoch token-weighted mean losses.
    start_dir continues a saved adapter (PeftModel.from_pretrained, trainable)."""
    from peft import PeftModel

    if start_dir is not None and json.loads((Path(start_dir) / "adapter_config.json").read_text())["peft_type"] \
            == "PROMPT_TUNING":  # PEFT 0.21 refuses is_trainable for prompt learning: a fresh module, saved tensors
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        pm = peft_attach(base, pcfg, seed, user_id)
        set_peft_model_state_dict(pm, load_file(str(Path(start_dir) / "adapter_model.safetensors")))
    elif start_dir is not None:
        pm = PeftModel.from_pretrained(base, str(start_dir), is_trainable=True)
    else:
        pm = peft_attach(base, pcfg, seed, user_id)
    try:
        data = encode(tok, examples, max_len)
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=ucfg.lr, weight_decay=ucfg.weight_decay)
        plan = batches(len(data), ucfg.batch_size, ucfg.epochs,
                       user_seed(seed, user_id) if order_seed is None else order_seed)
        total = sum(len(e) for e in plan)
        pm.train()
        step, out = 0, []
        for epoch in plan:
            tot, ntok = 0.0, 0
            for idx in epoch:
                b = collate([data[i] for i in idx], tok.pad_token_id)
                for g in opt.param_groups:
                    g["lr"] = _lr(step, total, ucfg.lr, ucfg.warmup_ratio)
                loss = pm(**b).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, ucfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                n = int((b["labels"][:, 1:] != -100).sum())
                tot += loss.item() * n
                ntok += n
                step += 1
            out.append(tot / max(1, ntok))
        pm.eval()
        if save_dir is not None:
            pm.save_pretrained(str(save_dir))
    finally:
        peft_detach(pm)
    return out


@torch.no_grad()
def peft_generate(base, tok, prompts, user_dir: str | Path | None, max_new_tokens: int,
                  max_prompt_tokens: int = 384) -> list[str]:
    """Greedy text for each prompt, one at a time, with PEFT's model (or the plain base) and HF generate.
    Prompt tuning decodes without a KV cache (PEFT 0.21 + transformers 5 re-prepend the virtual
    tokens at every cached step)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(user_dir)) if user_dir is not None else base
    model.eval()
    use_cache = not (user_dir is not None and model.peft_config["default"].is_prompt_learning)
    try:
        out = []
        for seq in tokenize_prompts(tok, prompts, max_prompt_tokens):
            ids = torch.tensor([seq])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, num_beams=1, use_cache=use_cache)
            toks = gen[0, ids.shape[1]:].tolist()
            if tok.eos_token_id in toks:
                toks = toks[:toks.index(tok.eos_token_id)]
            out.append(tok.decode(toks, skip_special_tokens=True))
        return out
    finally:
        if user_dir is not None:
            peft_detach(model)
