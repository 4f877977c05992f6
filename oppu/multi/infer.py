"""Mixed-adapter inference: one batch, a different user's PEFT module (or none) on every row.

Works for LoRA, IA3 and prompt tuning alike (PEFT's own `adapter_names` covers LoRA only), with
KV-cached greedy decoding. Each row's text equals running that user alone through
`oppu.adapters.load_user` + `oppu.engine.generate` on that prompt; rows without a user equal the
plain base.

    texts = generate_mixed(base, tok, prompts, users=["u1", None, "u2"],
                           adapters={"u1": "adapters/u1", "u2": "adapters/u2"}, max_new_tokens=8)

    with MultiUserModel(base) as mm:             # a server: load once, serve many batches
        mm.load_users(adapters)
        texts = generate_with(mm, tok, prompts, users, max_new_tokens=8)

Shapes: greedy_rows takes N token lists, left-pads them to [N, T]; the prefill runs
[N, P + T] (P virtual prompt-tuning positions, 0 if no row uses prompt tuning) and fills a KV
cache; each decode step feeds [N, 1] with position = that row's last position + 1.

Decoding is plain argmax: logits processors a checkpoint's generation_config may ask for
(repetition penalty, ...) are not applied; for greedy decoding with default settings this is what
`model.generate(do_sample=False)` does.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Mapping, Sequence

import torch

from oppu.engine import left_pad, tokenize_prompts
from oppu.multi.model import MultiUserModel


@torch.no_grad()
def greedy_rows(mm: MultiUserModel, seqs: Sequence[Sequence[int]], users: Sequence[str | None],
                max_new_tokens: int, eos_id: int, pad_id: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy continuation of each row with its user's module: (new token ids per row, cut after
    EOS exclusive; the prefill's last-position logits [N, V] in fp32)."""
    base = mm.base
    base.eval()
    # transformers 5.x renames past_key_values -> cache (the old name warns, then goes in 5.40)
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    ids, att = left_pad(seqs, pad_id)
    inputs = mm.prepare(ids, att, users)
    out = base(**inputs, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float()
    mask, pos = inputs["attention_mask"], inputs["position_ids"][:, -1:]
    n = len(seqs)
    done = torch.zeros(n, dtype=torch.bool)
    gen: list[list[int]] = [[] for _ in range(n)]
    logits = first
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)                                              # [N]
        for i, t in enumerate(nxt.tolist()):
            if not done[i] and t != eos_id:
                gen[i].append(t)
        done |= nxt.cpu() == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        pos = pos + 1
        out = base(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                   **{cache_kw: out.get(cache_kw)})
        logits = out.logits[:, -1].float()
    mm.ctx.clear()
    return gen, first


def generate_with(mm: MultiUserModel, tok, prompts: Sequence[str], users: Sequence[str | None],
                  max_new_tokens: int, batch_size: int = 32, max_prompt_tokens: int = 384) -> list[str]:
    """Texts for prompts[i] under users[i]'s loaded module (None = plain base), in input order."""
    if len(prompts) != len(users):
        raise ValueError(f"{len(prompts)} prompts but {len(users)} users")
    if not prompts:
        return []
    seqs = tokenize_prompts(tok, prompts, max_prompt_tokens)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # less padding per batch
    out = [""] * len(seqs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        gen, _ = greedy_rows(mm, [seqs[i] for i in idx], [users[i] for i in idx], max_new_tokens,
                             tok.eos_token_id, tok.pad_token_id)
        for i, toks in zip(idx, gen):
            out[i] = tok.decode(toks, skip_special_tokens=True)
    return out


def generate_mixed(base, tok, prompts: Sequence[str], users: Sequence[str | None],
                   adapters: Mapping[str, str | Path], max_new_tokens: int, batch_size: int = 32,
                   max_prompt_tokens: int = 384) -> list[str]:
    """Load the named users' adapters, generate every row with its own, restore the base."""
    needed = sorted({u for u in users if u is not None})
    missing = [u for u in needed if u not in adapters]
    if missing:
        raise KeyError(f"no adapter directory for user(s) {missing[:5]}; adapters given for {sorted(adapters)[:10]}")
    with MultiUserModel(base) as mm:
        mm.load_users({u: adapters[u] for u in needed})
        return generate_with(mm, tok, prompts, users, max_new_tokens, batch_size, max_prompt_tokens)
