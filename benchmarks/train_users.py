"""Training many users' PEFT modules: oppu's batched trainer vs the paper's one-user-at-a-time PEFT.

Both arms train the same users, on the same examples, from the same seeded initialisation, with
the same data order, epochs, batch size, lr, AdamW (no warm-up, constant lr, grad-norm clip 1.0)
and loss (target tokens only), on the same freshly built base:

  batched     oppu.engine.train_users: up to --max-users-per-batch users share every forward and
              backward (one row -> slot index; each user's gradient is its solo gradient)
  sequential  for each user: a fresh `get_peft_model` + `transformers.Trainer` (the paper's way,
              --baseline trainer, the default) or a plain PyTorch loop (--baseline loop), one user
              after another (benchmarks/_common.py, the PEFT baseline arm: no engine training code;
              the examples are oppu.engine.batching's encoding, in its data order)

The arms alternate every --chunk-users users (and take turns going first), so on shared cores
both see the same drift in load; each arm's time is the sum over its chunks. Each arm also
reports `cpu_s`, this process's CPU time (with one torch thread, the steadier measure of the work
on shared cores) and `ratio_vs_sequential_peft_cpu`. Users come from a synthetic world of --task
(LaMP_2M by default; ~40 history items each, plain prompts), or with --data from a LaMP
directory's dev split (real text: --data ../shared/data/commits-numpy --task LaMP_4). The last
stdout line is one JSON object: users_per_hour of each arm, ratio_vs_sequential_peft, both arms' final
losses (mean over users of the last epoch's token-weighted loss) and their relative difference,
achieved FLOP/s and MFU, machine details.

FLOPs: the base is frozen, so training does a forward (2·N FLOPs per token) and the gradients of
the activations (another 2·N), but no weight gradients (the 2·N a full fine-tune adds):

    mfu = mfu_needed = needed / wall / peak, needed = epochs * (4 * N_top * T + 4 * N_head * targets)
                                                      + (1 if reused else epochs) * 2 * N_below * T
    mfu_4n = 4 * N * tokens / wall / peak      mfu_6n = 6 * N * tokens / wall / peak (the usual count)

N_top: nn.Linear params of the adapted layers (all decoder layers without --top-layers), N_below:
those of the frozen layers below them (forward only; once per example when the engine reuses
their hidden states, engine/prefix.py), N_head: the lm_head, which the engine runs at target
positions only.

N = params of every nn.Linear incl. lm_head, tokens = every non-pad training token over all
epochs, peak = the best fp32 [n, n] @ [n, n] matmul FLOP/s measured in the same run. Attention-score
FLOPs and the adapters' own (rank 8) FLOPs are left out of all three.

    python benchmarks/train_users.py                       # 64 users, tiny base, defaults below
    python benchmarks/train_users.py --users 4 --preset micro --epochs 1   # seconds
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from _common import (corpus_of, data_users, emit, load_bench_base, machine_info, matmul_params, mean, peak_matmul_flops,
                     peft_train_user, peft_trainer_user, plain_examples, resolve, set_threads, timed_cpu, world_users)


def sequential_peft(model, tok, examples: dict, pcfg, ucfg, seed: int, max_len: int, out: Path | None,
                    device: str, baseline: str = "trainer") -> dict[str, list[float]]:
    """The paper's way: one fresh PeftModel per user (transformers.Trainer or a plain loop), in turn."""
    from oppu.store.files import safe_user_dir

    losses = {}
    with tempfile.TemporaryDirectory() as scratch:
        for uid, exs in examples.items():
            save = out / safe_user_dir(uid) if out is not None else None
            if baseline == "trainer":
                losses[uid] = peft_trainer_user(model, tok, exs, pcfg, ucfg, seed, uid, save, max_len, device,
                                                Path(scratch))
            else:
                losses[uid] = peft_train_user(model, tok, exs, pcfg, ucfg, seed, uid, save, max_len)
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4, help="per-user epochs (UserTrainConfig default)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--peft", default="lora", choices=("lora", "ia3", "prompt_tuning"))
    ap.add_argument("--baseline", default="trainer", choices=("trainer", "loop"),
                    help="sequential arm: PEFT + transformers.Trainer (the paper's way) or PEFT + a plain loop")
    ap.add_argument("--max-users-per-batch", type=int, default=16)
    ap.add_argument("--tokens-per-forward", type=int, default=None,
                    help="batched arm: padded tokens per forward/backward chunk (default: oppu's)")
    ap.add_argument("--chunk-users", type=int, default=16,
                    help="alternate the two arms every this many users (0 = each arm once over all users)")
    ap.add_argument("--preset", default="tiny", help="tiny-base preset: micro | tiny | small (with --base tiny)")
    ap.add_argument("--base", default="tiny", help="tiny (--preset), smollm2, a .gguf file or a local HF dir")
    ap.add_argument("--target-modules", default=None,
                    help="LoRA targets (default: all-linear on a tiny base, q_proj,v_proj on a checkpoint)")
    ap.add_argument("--top-layers", type=int, default=0, help="modules on the last N decoder layers only (0 = all)")
    ap.add_argument("--arms", default="both", choices=("both", "batched"),
                    help="batched: oppu's trainer alone (no PEFT arm, no ratio)")
    ap.add_argument("--data", default="", help="a LaMP directory: users from its dev split (default: a synthetic "
                                              "LaMP_2M world)")
    ap.add_argument("--task", default="LaMP_2M", help="the task of --data (e.g. LaMP_4 for commits-numpy)")
    ap.add_argument("--min-history", type=int, default=36)
    ap.add_argument("--max-history", type=int, default=44)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default); 1: on shared cores more threads thrash")
    ap.add_argument("--peak-size", type=int, default=2048, help="n of the [n, n] fp32 matmul for peak FLOP/s")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from oppu.config import TOKENS_PER_FORWARD, UserTrainConfig
    from oppu.engine import encode, peft_config, train_users

    set_threads(args.threads)
    tpf = args.tokens_per_forward or TOKENS_PER_FORWARD
    device = resolve(args.device)
    tiny = args.base == "tiny" or args.base.startswith("tiny:")
    base = f"tiny:{args.preset}" if args.base == "tiny" else args.base
    targets = args.target_modules or ("all-linear" if tiny else "q_proj,v_proj")
    ucfg = UserTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, target_modules=targets,
                           top_layers=args.top_layers)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.data:
            users, task = data_users(args.data, args.task, args.users, args.min_history, args.max_history)
        else:
            users, task = world_users(tmp, args.users, args.min_history, args.max_history, args.seed, task_id=args.task)
        examples = plain_examples(task, users, "compact" if tiny else "full")
        model, tok = load_bench_base(base, tmp / "base", corpus_of(examples), device, args.seed)
        n_mm = matmul_params(model)
        from oppu.engine import n_layers_of
        n_layers = n_layers_of(model)
        tokens = args.epochs * sum(len(e.ids) for exs in examples.values() for e in encode(tok, exs, args.max_len))
        peak = peak_matmul_flops(device, args.peak_size)
        print(f"{len(examples)} users, {sum(map(len, examples.values()))} examples, {tokens} training tokens; "
              f"base {sum(p.numel() for p in model.parameters())} params ({n_mm} in matmuls); "
              f"peak fp32 matmul {peak / 1e9:.1f} GFLOP/s", file=sys.stderr)

        # warm-up both paths on one user's few examples (first-call allocations, lazy imports)
        first = next(iter(examples))
        warm = {first: examples[first][:2 * args.batch_size]}
        wcfg = UserTrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, target_modules=targets,
                               top_layers=args.top_layers)
        train_users(model, tok, warm, peft_config(args.peft, wcfg, n_layers), wcfg, args.seed, max_len=args.max_len)
        if args.arms == "both":
            sequential_peft(model, tok, warm, peft_config(args.peft, wcfg, n_layers), wcfg, args.seed, args.max_len,
                            None, device, args.baseline)

        def run_batched(chunk):
            return train_users(model, tok, chunk, peft_config(args.peft, ucfg, n_layers), ucfg, args.seed,
                               save_root=tmp / "batched", max_len=args.max_len,
                               max_users_per_batch=args.max_users_per_batch, tokens_per_forward=tpf)

        def run_sequential(chunk):
            return sequential_peft(model, tok, chunk, peft_config(args.peft, ucfg, n_layers), ucfg, args.seed, args.max_len,
                                   tmp / "sequential", device, args.baseline)

        # On shared cores the load drifts over minutes: alternate the arms chunk by chunk (who goes
        # first alternates too) so both see the same drift; --chunk-users 0 runs each arm in one go.
        uids = list(examples)
        size = args.chunk_users or len(uids)
        losses = {"b": {}, "s": {}}
        wall, cpu = {"b": 0.0, "s": 0.0}, {"b": 0.0, "s": 0.0}
        for k, i in enumerate(range(0, len(uids), size)):
            chunk = {u: examples[u] for u in uids[i:i + size]}
            arms = [(run_batched, "b"), (run_sequential, "s")] if args.arms == "both" else [(run_batched, "b")]
            for fn, name in (arms if k % 2 == 0 else arms[::-1]):
                res, w, c = timed_cpu(lambda: fn(chunk), device)
                losses[name].update(res)
                wall[name] += w
                cpu[name] += c
            print(f"users {i + len(chunk)}/{len(uids)}: batched {wall['b']:.1f}s, sequential PEFT "
                  f"({args.baseline}) {wall['s']:.1f}s", file=sys.stderr)
        batched, seq, t_b, t_s = losses["b"], losses["s"], wall["b"], wall["s"]

    final_b = mean([v[-1] for v in batched.values()])
    final_s = mean([v[-1] for v in seq.values()]) if seq else float("nan")
    f6, f4 = 6 * n_mm * tokens, 4 * n_mm * tokens
    f_need, counts = needed_flops(model, tok, examples, args, n_layers)

    def arm(t: float) -> dict:
        if not t:
            return {}
        return {"wall_s": round(t, 2), "users_per_hour": round(len(examples) / t * 3600, 1),
                "seconds_per_user": round(t / len(examples), 2), "tokens_per_s": round(tokens / t, 1),
                "mfu": round(f_need / t / peak, 4), "mfu_needed": round(f_need / t / peak, 4),
                "flops_per_s": round(f4 / t), "mfu_4n": round(f4 / t / peak, 4),
                "flops_per_s_6n": round(f6 / t), "mfu_6n": round(f6 / t / peak, 4)}
    result = {
        "benchmark": "train_users", "users": len(examples), "data": args.data or f"synthetic {args.task}", "peft": args.peft, "preset": args.preset,
        "baseline": args.baseline, "epochs": args.epochs, "batch_size": args.batch_size,
        "max_users_per_batch": args.max_users_per_batch, "tokens_per_forward": tpf, "chunk_users": args.chunk_users,
        "examples": sum(map(len, examples.values())), "train_tokens": tokens, "matmul_params": n_mm,
        "batched": {**arm(t_b), "cpu_s": round(cpu["b"], 2), "final_loss": round(final_b, 5)},
        "sequential_peft": {**arm(t_s), "cpu_s": round(cpu["s"], 2), "final_loss": round(final_s, 5)},
        "ratio_vs_sequential_peft": round(t_s / t_b, 3) if seq else None,
        "ratio_vs_sequential_peft_cpu": round(cpu["s"] / cpu["b"], 3) if seq else None,
        "final_loss_rel_diff": round(abs(final_b - final_s) / abs(final_s), 6) if seq else None,
        "base": args.base, "target_modules": targets, "top_layers": args.top_layers, "threads": torch.get_num_threads(),
        "needed_flops": round(f_need), **counts,
        "peak_matmul_flops": round(peak),
        "flops_formula": "mfu = mfu_needed (below); 4*N*tokens (flops_per_s, mfu_4n: forward + input gradients of "
                         "a frozen base at every position), "
                         "6*N*tokens (flops_per_s_6n, mfu_6n: with weight gradients); N=nn.Linear params; "
                         "mfu_needed: what this training needs at the least: per epoch 4*N_top*T + 4*N_head*targets, "
                         "plus 2*N_below*T once (frozen layers below the lowest adapted one, reused after epoch 1) "
                         "or every epoch (no reuse); attention scores left out",
        "machine": machine_info(device),
    }
    emit(result)
    return result


def needed_flops(model, tok, examples: dict, args, n_layers: int | None) -> tuple[float, dict]:
    """FLOPs this training needs at the least (see flops_formula): frozen layers below the lowest
    adapted one run forward once per example when the engine reuses them (2+ epochs), the adapted
    layers forward + input gradients every epoch, the lm_head only at target positions."""
    import re

    from oppu.engine import encode
    from oppu.engine.prefix import FrozenPrefix
    lo = n_layers - args.top_layers if (args.top_layers and n_layers) else 0
    below = top = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            hit = re.search(r"layers\.(\d+)\.", name)
            if hit and int(hit.group(1)) < lo:
                below += m.weight.numel()
            else:
                top += m.weight.numel()
    head = model.get_output_embeddings().weight.numel()
    enc = [e for exs in examples.values() for e in encode(tok, exs, args.max_len)]
    t = sum(len(e.ids) for e in enc)
    targets = sum(len(e.ids) - e.n_prompt for e in enc)
    reuse = FrozenPrefix.for_trainer(model.base_model, [f"layers.{lo}."] if lo else [], args.epochs, t) is not None
    need = args.epochs * (4 * top * t + 4 * head * targets) + (1 if reuse else args.epochs) * 2 * below * t
    return need, {"params_below": below, "params_adapted_layers": top, "head_params": head,
                  "target_tokens_per_epoch": targets, "prefix_reused": reuse}


if __name__ == "__main__":
    main()
