"""Serving many users at once: oppu's mixed-adapter batch vs PEFT adapter swapping.

--users users each send one request (the plain prompt of their first query in a synthetic
LaMP_2M world), all arriving at t=0, for each PEFT type (LoRA, IA3, prompt tuning):

  mixed         oppu.engine.generate on a MultiUserModel holding every user's module (read_adapter +
                add_user): one batch, a different user on every row. Each request's latency = the
                batch's time.
  adapter_swap  one PeftModel with every user's adapter loaded (`load_adapter`), then for each
                user in turn `set_adapter` + PEFT's own HF `generate` (benchmarks/_common.py
                peft_greedy: the PEFT baseline, no engine decoding code). A request's latency counts the
                queue: the time until that user's generate finished.
  peft_adapter_names  (LoRA only, for reference) PEFT's own mixed batch: one `generate` with
                `adapter_names=[one per row]`; PEFT has no such path for IA3 or prompt tuning.

Adapters are seeded PEFT initialisations (oppu.engine.initial_module) pushed away from identity with
seeded noise and saved in the PEFT format (write_adapter); throughput does not depend on training
them. The base is a freshly built tiny Llama. Greedy decoding, up to --max-new-tokens. tokens/s =
generated tokens (the outputs re-tokenized) / wall time; each arm is timed --repeats times after a
warm-up and the fastest run is kept (the cores are shared).
`outputs_identical` is the fraction of requests whose text is the same in both arms; `cpu_s` (this
process's CPU time, one torch thread) and `ratio_vs_adapter_swap_cpu` are steadier on shared cores.

On this stack PEFT's cached generate is wrong for prompt tuning (PEFT 0.21 + transformers 5 re-prepend
the virtual tokens at every cached step), so the swap arm decodes prompt tuning without a KV cache;
that is what PEFT offers here, and it is slower.

    python benchmarks/serve_users.py                         # 32 users, lora + ia3 + prompt_tuning
    python benchmarks/serve_users.py --users 4 --preset micro --max-new-tokens 4
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import (corpus_of, emit, load_bench_base, machine_info, peft_greedy, percentile, plain_examples,
                     query_prompts, resolve, set_threads, sync, timed, timed_cpu, world_users)

KINDS = ("lora", "ia3", "prompt_tuning")


def make_adapters(model, kind: str, uids: list[str], ucfg, seed: int, root: Path) -> dict[str, Path]:
    """A seeded PEFT module per user, moved off identity by seeded noise, saved in the PEFT format."""
    from oppu.engine import initial_module, peft_config, user_seed, write_adapter
    from oppu.store.files import safe_user_dir

    dirs, pcfg = {}, peft_config(kind, ucfg)
    for uid in uids:
        config, state = initial_module(model, pcfg, seed, uid)
        g = torch.Generator().manual_seed(user_seed(seed + 1, uid))
        scale = 0.3 if kind == "prompt_tuning" else 0.1
        state = {k: v + torch.randn(v.shape, generator=g).to(v) * scale for k, v in state.items()}
        dirs[uid] = write_adapter(root / kind / safe_user_dir(uid), config, state, str(model.name_or_path))
    return dirs


def n_tokens(tok, texts) -> int:
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def best_of(repeats: int, run, device: str):
    """Run `run()` (-> (outputs, per-request finish times)) `repeats` times; keep the fastest
    (outputs, finish times, wall s, CPU s)."""
    best = None
    for _ in range(repeats):
        (outs, finish), wall, cpu = timed_cpu(run, device)
        if best is None or wall < best[2]:
            best = (outs, finish, wall, cpu)
    return best


def arm_stats(tok, outs: list[str], finish: list[float], wall: float, cpu: float) -> dict:
    toks = n_tokens(tok, outs)
    return {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "generated_tokens": toks,
            "tokens_per_s": round(toks / wall, 1),
            "p50_latency_ms": round(1000 * percentile(finish, 50), 2),
            "p99_latency_ms": round(1000 * percentile(finish, 99), 2)}


def mixed_arm(base_dir: Path, dirs: dict, prompts: list[str], uids: list[str], args, device: str) -> dict:
    from oppu.engine import MultiUserModel, generate, read_adapter
    from oppu.model.base import load_base

    model, tok = load_base(base_dir, device=device)
    with MultiUserModel(model) as mm:
        def load_all():
            for u in uids:
                mm.add_user(u, *read_adapter(dirs[u]))
        _, load_s = timed(load_all, device)
        generate(model, tok, prompts[:2], args.max_new_tokens, users=uids[:2], mm=mm)  # warm-up

        def run():
            outs = generate(model, tok, prompts, args.max_new_tokens, users=uids, mm=mm, batch_size=len(prompts))
            sync(device)
            return outs, None
        outs, _, wall, cpu = best_of(args.repeats, run, device)
    return {**arm_stats(tok, outs, [wall] * len(outs), wall, cpu), "load_all_s": round(load_s, 3)}, outs


def swap_arm(base_dir: Path, dirs: dict, prompts: list[str], uids: list[str], args, device: str) -> dict:
    from peft import PeftModel

    from oppu.model.base import load_base

    model, tok = load_base(base_dir, device=device)

    def load():
        pm = PeftModel.from_pretrained(model, str(dirs[uids[0]]), adapter_name=uids[0], is_trainable=False)
        for u in uids[1:]:
            pm.load_adapter(str(dirs[u]), adapter_name=u, is_trainable=False)
        return pm
    pm, load_s = timed(load, device)
    pm.eval()
    use_cache = not pm.peft_config[uids[0]].is_prompt_learning
    pm.set_adapter(uids[0])
    peft_greedy(pm, tok, prompts[:1], args.max_new_tokens, use_cache)  # warm-up

    def run():
        outs, finish, t0 = [], [], time.perf_counter()
        for u, p in zip(uids, prompts):
            pm.set_adapter(u)
            outs.append(peft_greedy(pm, tok, [p], args.max_new_tokens, use_cache)[0])
            sync(device)
            finish.append(time.perf_counter() - t0)
        return outs, finish
    outs, finish, wall, cpu = best_of(args.repeats, run, device)
    return {**arm_stats(tok, outs, finish, wall, cpu), "load_all_s": round(load_s, 3)}, outs


def adapter_names_arm(base_dir: Path, dirs: dict, prompts: list[str], uids: list[str], args, device: str) -> dict:
    """PEFT's own LoRA mixed batch (`adapter_names`), one generate for all requests."""
    from peft import PeftModel

    from oppu.engine.batching import left_pad, tokenize_prompts
    from oppu.model.base import load_base

    model, tok = load_base(base_dir, device=device)
    pm = PeftModel.from_pretrained(model, str(dirs[uids[0]]), adapter_name=uids[0], is_trainable=False)
    for u in uids[1:]:
        pm.load_adapter(str(dirs[u]), adapter_name=u, is_trainable=False)
    pm.eval()
    ids, att = left_pad(tokenize_prompts(tok, prompts, 384), tok.pad_token_id)

    @torch.no_grad()
    def gen(rows: int):
        out = pm.generate(input_ids=ids[:rows].to(device), attention_mask=att[:rows].to(device), do_sample=False,
                          max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, num_beams=1, adapter_names=uids[:rows])
        texts = []
        for row in out[:, ids.shape[1]:].cpu().tolist():
            row = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            texts.append(tok.decode(row, skip_special_tokens=True))
        return texts, None
    gen(2)  # warm-up
    outs, _, wall, cpu = best_of(args.repeats, lambda: gen(len(prompts)), device)
    return arm_stats(tok, outs, [wall] * len(outs), wall, cpu), outs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--peft", default=",".join(KINDS), help="comma list of: lora, ia3, prompt_tuning")
    ap.add_argument("--preset", default="tiny", help="tiny-base preset: micro | tiny | small (with --base tiny)")
    ap.add_argument("--base", default="tiny", help="tiny (--preset), smollm2, a .gguf file or a local HF dir")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per arm; the fastest is kept")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default); 1: on shared cores more threads thrash")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.peft.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        ap.error(f"unknown PEFT type(s) {bad or kinds}; valid: {', '.join(KINDS)}")

    from oppu.config import UserTrainConfig

    set_threads(args.threads)
    device = resolve(args.device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        users, task = world_users(tmp, args.users, 8, 16, args.seed)
        by_user = query_prompts(task, users)
        uids, prompts = list(by_user), list(by_user.values())
        tiny = args.base == "tiny" or args.base.startswith("tiny:")
        model, _ = load_bench_base(f"tiny:{args.preset}" if args.base == "tiny" else args.base, tmp / "base",
                                   corpus_of(plain_examples(task, users), by_user), device, args.seed)
        base_dir = Path(model.name_or_path)
        if not tiny:  # a checkpoint: the checkpoint defaults' LoRA targets, full-style (chat) prompts
            by_user = query_prompts(task, users, "full")
            prompts = list(by_user.values())
        ucfg = UserTrainConfig() if tiny else UserTrainConfig(target_modules="q_proj,v_proj", lora_alpha=8)
        for kind in kinds:
            dirs = make_adapters(model, kind, uids, ucfg, args.seed, tmp / "adapters")
            mixed, outs_m = mixed_arm(base_dir, dirs, prompts, uids, args, device)
            swap, outs_s = swap_arm(base_dir, dirs, prompts, uids, args, device)
            r = {"mixed": mixed, "adapter_swap": swap,
                 "ratio_vs_adapter_swap": round(swap["wall_s"] / mixed["wall_s"], 3),
                 "ratio_vs_adapter_swap_cpu": round(swap["cpu_s"] / mixed["cpu_s"], 3),
                 "outputs_identical": round(sum(a == b for a, b in zip(outs_m, outs_s)) / len(outs_m), 4)}
            if kind == "lora":
                names, outs_n = adapter_names_arm(base_dir, dirs, prompts, uids, args, device)
                r["peft_adapter_names"] = names
                r["ratio_vs_peft_adapter_names"] = round(names["wall_s"] / mixed["wall_s"], 3)
                r["outputs_identical_adapter_names"] = round(
                    sum(a == b for a, b in zip(outs_m, outs_n)) / len(outs_m), 4)
            results[kind] = r
            print(f"{kind}: mixed {mixed['tokens_per_s']} tok/s, swap {swap['tokens_per_s']} tok/s, "
                  f"ratio {r['ratio_vs_adapter_swap']}", file=sys.stderr)
    result = {"benchmark": "serve_users", "users": len(uids), "requests": len(prompts), "preset": args.preset,
              "base": args.base, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "results": results,
              "machine": machine_info(device)}
    emit(result)
    return result


if __name__ == "__main__":
    main()
