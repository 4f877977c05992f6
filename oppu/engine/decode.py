"""The one decoder: KV-cached greedy decoding of a batch in which every row may use another user's
PEFT module (LoRA, IA3, prompt tuning) or none (the plain base).

Each row's text equals running that user alone through PEFT (`PeftModel` + `generate` with greedy
decoding) on that prompt; rows without a user equal the plain base. Decoding stops at the
tokenizer's end token (end of turn for a chat model, see batching.end_id) or EOS.

    texts = generate(base, tok, prompts, max_new_tokens=8)                        # plain base
    texts = generate_mixed(base, tok, prompts, ["u1", None], {"u1": "adapters/u1"}, 8)
    with MultiUserModel(base) as mm:                                              # a server
        mm.add_user("u1", *read_adapter("adapters/u1"))
        texts = generate(base, tok, prompts, 8, users=["u1", None], mm=mm)

Shapes: greedy_rows takes N token lists, left-pads them to [N, T]; the prefill runs [N, P + T]
(P virtual prompt-tuning positions, 0 if no row uses prompt tuning) and fills a KV cache; each
decode step feeds [N, 1] with position = that row's last position + 1.

Decoding is plain argmax: logits processors a checkpoint's generation_config may ask for
(repetition penalty, ...) are not applied; for greedy decoding with default settings this is what
`model.generate(do_sample=False)` does.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from oppu.engine.batching import end_id, left_pad, tokenize_prompts
from oppu.engine.format import read_adapter
from oppu.engine.model import MultiUserModel


def stop_ids(tok) -> set[int]:
    return {i for i in (end_id(tok), tok.eos_token_id) if i is not None}


def _plain_inputs(base, ids: torch.Tensor, att: torch.Tensor) -> dict[str, torch.Tensor]:
    dev = base.get_input_embeddings().weight.device
    att = att.to(dev)
    return {"input_ids": ids.to(dev), "attention_mask": att, "position_ids": (att.cumsum(-1) - 1).clamp(min=0)}


@torch.no_grad()
def greedy_rows(base, seqs: Sequence[Sequence[int]], users: Sequence[str | None] | None, max_new_tokens: int,
                stop: set[int], pad_id: int, mm: MultiUserModel | None = None) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy continuation of each row with its user's module: (new token ids per row, cut before
    the first stop token; the prefill's last-position logits [N, V] in fp32)."""
    base.eval()
    # transformers 5.x renames past_key_values -> cache (the old name warns, then goes in 5.40)
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    ids, att = left_pad(seqs, pad_id)
    if users is not None and any(u is not None for u in users):
        if mm is None:
            raise ValueError("rows name users but no MultiUserModel holds their modules")
        inputs = mm.prepare(ids, att, users)
    else:
        if mm is not None:
            mm.ctx.clear()
        inputs = _plain_inputs(base, ids, att)
    try:  # the prefill inside too: an error there must not leave these rows' context set
        out = base(**inputs, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float()
        gen = _decode_loop(base, out, cache_kw, first, inputs["attention_mask"], inputs["position_ids"][:, -1:],
                           max_new_tokens, stop, mm)
    finally:
        if mm is not None:
            mm.ctx.clear()
    return gen, first


def _decode_loop(base, out, cache_kw: str, logits: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 max_new_tokens: int, stop: set[int], mm: MultiUserModel | None) -> list[list[int]]:
    """Greedy steps from the prefill's `out`; rows that reached a stop token leave the batch (their
    cache rows and row context are dropped), so late steps compute only the rows still writing."""
    n = logits.shape[0]
    gen: list[list[int]] = [[] for _ in range(n)]
    live = list(range(n))                                                    # batch position -> row
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)                                              # [M]
        keep = []
        for j, t in enumerate(nxt.tolist()):
            if t in stop:
                continue
            gen[live[j]].append(t)
            keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        cache = out.get(cache_kw)
        if len(keep) < len(live):
            idx = torch.tensor(keep, device=mask.device)
            live, nxt, mask, pos = [live[j] for j in keep], nxt[idx], mask[idx], pos[idx]
            cache.batch_select_indices(idx)
            if mm is not None:
                mm.ctx.rows = {k: v[idx] for k, v in mm.ctx.rows.items()}
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        pos = pos + 1
        out = base(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache})
        logits = out.logits[:, -1].float()
    return gen


def generate(base, tok, prompts: Sequence[str], max_new_tokens: int, *, users: Sequence[str | None] | None = None,
             mm: MultiUserModel | None = None, batch_size: int = 32, max_prompt_tokens: int = 384,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """Texts for prompts[i] under users[i]'s loaded module (None or no users = plain base), in input
    order. Prompts are sorted by length into batches of `batch_size` rows (less padding)."""
    if users is not None and len(prompts) != len(users):
        raise ValueError(f"{len(prompts)} prompts but {len(users)} users")
    if not prompts:
        return []
    seqs = tokenize_prompts(tok, prompts, max_prompt_tokens)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [""] * len(seqs)
    stop = stop_ids(tok)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        gen, _ = greedy_rows(base, [seqs[i] for i in idx], None if users is None else [users[i] for i in idx],
                             max_new_tokens, stop, tok.pad_token_id, mm)
        for i, toks in zip(idx, gen):
            out[i] = tok.decode(toks, skip_special_tokens=True)
        if progress:
            progress(len(idx))
    return out


def generate_mixed(base, tok, prompts: Sequence[str], users: Sequence[str | None],
                   adapters: Mapping[str, str | Path], max_new_tokens: int, batch_size: int = 32,
                   max_prompt_tokens: int = 384, progress: Callable[[int], None] | None = None) -> list[str]:
    """Load the named users' adapters, generate every row with its own, restore the base."""
    needed = sorted({u for u in users if u is not None})
    missing = [u for u in needed if u not in adapters]
    if missing:
        raise KeyError(f"no adapter directory for user(s) {missing[:5]}; adapters given for {sorted(adapters)[:10]}")
    with MultiUserModel(base) as mm:
        for u in needed:
            mm.add_user(u, *read_adapter(adapters[u]))
        return generate(base, tok, prompts, max_new_tokens, users=users, mm=mm, batch_size=batch_size,
                        max_prompt_tokens=max_prompt_tokens, progress=progress)
