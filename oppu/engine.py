"""Batched greedy generation with a KV cache, for the base alone or with one user's adapter.

Prompts are sorted by length into batches (less padding), left-padded, generated with greedy
decoding until EOS or `max_new_tokens`, and returned in the original order as text.

    texts = generate(model, tok, prompts, max_new_tokens=8)
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def tokenize_prompts(tok, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """BOS + prompt ids, truncated from the left (BOS kept) so the cue stays at the end."""
    ids = tok(list(prompts), add_special_tokens=True)["input_ids"]
    out = []
    for p in ids:
        p = list(p)
        if len(p) > max_prompt_tokens:
            keep_bos = tok.bos_token_id is not None and p[0] == tok.bos_token_id
            p = (p[:1] + p[len(p) - max_prompt_tokens + 1:]) if keep_bos else p[len(p) - max_prompt_tokens:]
        out.append(p)
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] input_ids and attention_mask, left-padded."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(list(s))
            att[i, T - len(s):] = 1
    return ids, att


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32,
             max_prompt_tokens: int = 384, progress: Callable[[int], None] | None = None) -> list[str]:
    if not prompts:
        return []
    seqs = tokenize_prompts(tok, prompts, max_prompt_tokens)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[str] = [""] * len(seqs)
    device = next(model.parameters()).device
    model.eval()
    # PEFT 0.21 prompt learning looks for `past_key_values`, transformers 5 passes `cache`: with a
    # KV cache it re-prepends the virtual tokens at every step. Decode without the cache there
    # (oppu.multi.generate_mixed serves prompt tuning with a correct cache).
    cfg = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    use_cache = not getattr(cfg, "is_prompt_learning", False)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, att = left_pad([seqs[i] for i in idx], tok.pad_token_id)
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, num_beams=1, use_cache=use_cache)
        new = gen[:, ids.shape[1]:].cpu()
        for row, i in enumerate(idx):
            toks = new[row].tolist()
            if tok.eos_token_id in toks:
                toks = toks[:toks.index(tok.eos_token_id)]
            out[i] = tok.decode(toks, skip_special_tokens=True)
        if progress:
            progress(len(idx))
    return out
