"""Training many users' PEFT modules: oppu's batched trainer vs the paper's one-user-at-a-time PEFT.

Both arms train the same users, on the same examples, from the same seeded initialisation, with
the same data order, epochs, batch size, lr, AdamW (no warm-up, constant lr, grad-norm clip 1.0)
and loss (target tokens only), on the same freshly built base:

  batched     oppu.multi.train_users: up to --max-users-per-batch users share every forward and
              backward (one row -> slot index; each user's gradient is its solo gradient)
  sequential  for each user: a fresh `get_peft_model` + `transformers.Trainer` (the paper's way),
              one user after another; the dataset is oppu.train.encode's, collated by oppu.train.collate

The arms alternate every --chunk-users users (and take turns going first), so on shared cores
both see the same drift in load; each arm's time is the sum over its chunks. Each arm also
reports `cpu_s`, this process's CPU time (with one torch thread, the steadier measure of the work
on shared cores) and `ratio_vs_sequential_peft_cpu`. Users come from a
synthetic LaMP_2M world (~40 history items each, plain prompts). The last stdout
line is one JSON object: users_per_hour of each arm, ratio_vs_sequential_peft, both arms' final
losses (mean over users of the last epoch's token-weighted loss) and their relative difference,
achieved FLOP/s and MFU, machine details.

FLOPs: `flops_per_s` = 6 * N * tokens / wall (the standard forward + backward count; N = params of every
nn.Linear incl. lm_head, tokens = every non-pad training token over all epochs); mfu = flops_per_s /
peak, peak = the best fp32 [n, n] @ [n, n] matmul FLOP/s measured in the same run. With a
frozen base there are no weight gradients, so the matmul work really done is ~4 * N * tokens
(forward + input gradients); `mfu_4n` reports that. Attention-score FLOPs and the adapters' own
(rank 8) FLOPs are left out of both; the batched arm also skips the lm_head on non-target positions.

    python benchmarks/train_users.py                       # 64 users, tiny base, defaults below
    python benchmarks/train_users.py --users 4 --preset micro --epochs 1   # seconds
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

from _common import (corpus_of, emit, machine_info, matmul_params, mean, peak_matmul_flops, plain_examples, resolve,
                     set_threads, timed_cpu, tiny_base, world_users)


def sequential_peft(model, tok, examples: dict, pcfg, ucfg, seed: int, max_len: int, out: Path | None,
                    device: str) -> dict[str, list[float]]:
    """The paper's way: one fresh PeftModel + transformers.Trainer per user, one user after another."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from oppu.adapters import attach, detach, safe_user_dir, user_seed
    from oppu.train import batches, collate, encode

    class PlanSampler(torch.utils.data.Sampler):
        """Yields oppu.train.batches' order for the epoch Trainer sets (the batched arm's order)."""

        def __init__(self, plan):
            self.perms = [[i for b in epoch for i in b] for epoch in plan]
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            return iter(self.perms[self.epoch % len(self.perms)])

        def __len__(self):
            return len(self.perms[0])

    class RecordingTrainer(Trainer):
        """transformers.Trainer that also records the token-weighted loss of each epoch."""

        def __init__(self, *a, plan, **kw):
            super().__init__(*a, **kw)
            self.sampler = PlanSampler(plan)
            self.sums: dict[int, list[float]] = {}

        def _get_train_sampler(self, train_dataset=None):
            return self.sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            n = int((inputs["labels"][:, 1:] != -100).sum())
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            s = self.sums.setdefault(self.sampler.epoch, [0.0, 0])
            s[0] += float((loss[0] if return_outputs else loss).detach()) * n
            s[1] += n
            return loss

    losses = {}
    with tempfile.TemporaryDirectory() as scratch:
        for uid, exs in examples.items():
            pm = attach(model, copy.deepcopy(pcfg), seed, uid)
            try:
                data = encode(tok, exs, max_len)
                args = TrainingArguments(
                    output_dir=scratch, num_train_epochs=ucfg.epochs, per_device_train_batch_size=ucfg.batch_size,
                    learning_rate=ucfg.lr, weight_decay=ucfg.weight_decay, optim="adamw_torch",
                    lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, eval_strategy="no",
                    save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
                    use_cpu=not device.startswith("cuda"), dataloader_num_workers=0,
                    dataloader_pin_memory=False, remove_unused_columns=False, seed=seed)
                tr = RecordingTrainer(model=pm, args=args, train_dataset=data,
                                      data_collator=lambda b: collate(b, tok.pad_token_id),
                                      plan=batches(len(data), ucfg.batch_size, ucfg.epochs, user_seed(seed, uid)))
                tr.remove_callback(PrinterCallback)  # its end-of-training dict would clutter stdout
                tr.train()
                losses[uid] = [s / max(1, n) for _, (s, n) in sorted(tr.sums.items())]
                if out is not None:
                    pm.save_pretrained(str(out / safe_user_dir(uid)))
            finally:
                detach(pm)
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4, help="per-user epochs (UserTrainConfig default)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--peft", default="lora", choices=("lora", "ia3", "prompt_tuning"))
    ap.add_argument("--max-users-per-batch", type=int, default=16)
    ap.add_argument("--tokens-per-forward", type=int, default=None,
                    help="batched arm: padded tokens per forward/backward chunk (default: oppu's)")
    ap.add_argument("--chunk-users", type=int, default=16,
                    help="alternate the two arms every this many users (0 = each arm once over all users)")
    ap.add_argument("--preset", default="tiny", help="tiny-base preset: micro | tiny | small")
    ap.add_argument("--min-history", type=int, default=36)
    ap.add_argument("--max-history", type=int, default=44)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default); 1: on shared cores more threads thrash")
    ap.add_argument("--peak-size", type=int, default=2048, help="n of the [n, n] fp32 matmul for peak FLOP/s")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from oppu.adapters import peft_config
    from oppu.config import UserTrainConfig
    from oppu.multi import train_users
    from oppu.config import TOKENS_PER_FORWARD
    from oppu.train import encode

    set_threads(args.threads)
    tpf = args.tokens_per_forward or TOKENS_PER_FORWARD
    device = resolve(args.device)
    ucfg = UserTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        users, task = world_users(tmp, args.users, args.min_history, args.max_history, args.seed)
        examples = plain_examples(task, users)
        model, tok = tiny_base(tmp / "base", corpus_of(examples), args.preset, device, args.seed)
        n_mm = matmul_params(model)
        tokens = args.epochs * sum(len(e.ids) for exs in examples.values() for e in encode(tok, exs, args.max_len))
        peak = peak_matmul_flops(device, args.peak_size)
        print(f"{len(examples)} users, {sum(map(len, examples.values()))} examples, {tokens} training tokens; "
              f"base {sum(p.numel() for p in model.parameters())} params ({n_mm} in matmuls); "
              f"peak fp32 matmul {peak / 1e9:.1f} GFLOP/s", file=sys.stderr)

        # warm-up both paths on one user's few examples (first-call allocations, lazy imports)
        first = next(iter(examples))
        warm = {first: examples[first][:2 * args.batch_size]}
        wcfg = UserTrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr)
        train_users(model, tok, warm, peft_config(args.peft, wcfg), wcfg, args.seed, max_len=args.max_len)
        sequential_peft(model, tok, warm, peft_config(args.peft, wcfg), wcfg, args.seed, args.max_len, None, device)

        def run_batched(chunk):
            return train_users(model, tok, chunk, peft_config(args.peft, ucfg), ucfg, args.seed,
                               save_root=tmp / "batched", max_len=args.max_len,
                               max_users_per_batch=args.max_users_per_batch, tokens_per_forward=tpf)

        def run_sequential(chunk):
            return sequential_peft(model, tok, chunk, peft_config(args.peft, ucfg), ucfg, args.seed, args.max_len,
                                   tmp / "sequential", device)

        # On shared cores the load drifts over minutes: alternate the arms chunk by chunk (who goes
        # first alternates too) so both see the same drift; --chunk-users 0 runs each arm in one go.
        uids = list(examples)
        size = args.chunk_users or len(uids)
        losses = {"b": {}, "s": {}}
        wall, cpu = {"b": 0.0, "s": 0.0}, {"b": 0.0, "s": 0.0}
        for k, i in enumerate(range(0, len(uids), size)):
            chunk = {u: examples[u] for u in uids[i:i + size]}
            arms = [(run_batched, "b"), (run_sequential, "s")]
            for fn, name in (arms if k % 2 == 0 else arms[::-1]):
                res, w, c = timed_cpu(lambda: fn(chunk), device)
                losses[name].update(res)
                wall[name] += w
                cpu[name] += c
            print(f"users {i + len(chunk)}/{len(uids)}: batched {wall['b']:.1f}s, sequential PEFT + Trainer "
                  f"{wall['s']:.1f}s", file=sys.stderr)
        batched, seq, t_b, t_s = losses["b"], losses["s"], wall["b"], wall["s"]

    final_b = mean([v[-1] for v in batched.values()])
    final_s = mean([v[-1] for v in seq.values()])
    f6, f4 = 6 * n_mm * tokens, 4 * n_mm * tokens

    def arm(t: float) -> dict:
        return {"wall_s": round(t, 2), "users_per_hour": round(len(examples) / t * 3600, 1),
                "flops_per_s": round(f6 / t), "mfu": round(f6 / t / peak, 4), "mfu_4n": round(f4 / t / peak, 4)}
    result = {
        "benchmark": "train_users", "users": len(examples), "peft": args.peft, "preset": args.preset,
        "epochs": args.epochs, "batch_size": args.batch_size, "max_users_per_batch": args.max_users_per_batch,
        "tokens_per_forward": tpf,
        "chunk_users": args.chunk_users,
        "examples": sum(map(len, examples.values())), "train_tokens": tokens, "matmul_params": n_mm,
        "batched": {**arm(t_b), "cpu_s": round(cpu["b"], 2), "final_loss": round(final_b, 5)},
        "sequential_peft": {**arm(t_s), "cpu_s": round(cpu["s"], 2), "final_loss": round(final_s, 5)},
        "ratio_vs_sequential_peft": round(t_s / t_b, 3),
        "ratio_vs_sequential_peft_cpu": round(cpu["s"] / cpu["b"], 3),
        "final_loss_rel_diff": round(abs(final_b - final_s) / abs(final_s), 6),
        "peak_matmul_flops": round(peak), "flops_formula": "6*N*tokens (mfu), 4*N*tokens (mfu_4n); N=nn.Linear params",
        "machine": machine_info(device),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
