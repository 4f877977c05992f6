"""The tables of docs/scaling.md, computed by oppu.plan from the assumptions stated here (no I/O but
stdout; tests/test_plan.py checks the doc carries exactly these rows).

    python -m oppu.plan_tables
"""
from __future__ import annotations

from oppu.plan import (LLAMA2_7B, Adapter, Arch, Workload, activation_bytes, adapter_file_bytes, adapter_params,
                       adapter_train_bytes, base_bytes, kv_cache_bytes, linear_params, prefix_reuse_max_tokens,
                       safetensors_bytes, adapter_tensors, total_params, train_flops, users_per_hour)

# SmolLM2-135M-Instruct's config (oppu/model/gguf.py materializes it; the test compares with the real one)
SMOLLM2 = Arch(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True, head_dim=64)

# One H200: 141 GB HBM3e, 989 TFLOP/s dense bf16 (NVIDIA's datasheet, the same as H100 SXM). Planning
# MFU 0.4, 0.2 the pessimistic case (why: docs/scaling.md). A reserve for the CUDA context, cuBLAS
# workspaces and allocator fragmentation.
GPU_BYTES, GPU_PEAK, GPU_MFU, GPU_MFU_LOW, GPU_RESERVE = 141e9, 989e12, 0.4, 0.2, 8e9
# The paper's history sizes as a planning case: 100 items of 300 tokens (16 of them target), 2 epochs;
# and a 32-item user (the SmolLM2 benchmark's size).
PAPER, SMALL = Workload(100, 300, 16, 2), Workload(32, 300, 16, 2)
TOP = 8                       # --top-layers
TPF_CHOICES = (4096, 8192, 16384, 32768, 65536)
USERS_PER_GENERATE, SERVE_TOKENS = 32, 400   # rows of a decode batch, cached positions per row (384 + 16)
RAY_GPUS = 8
BATCH_SIZE = 8                # UserTrainConfig.batch_size: rows per user per step
# Measured on SmolLM2 (docs/benchmarks.md, 2026-12-02, 2 threads): 4 users x 40 items, 38,398 tokens over
# 2 epochs (120 per item); seconds per user every layer / top 8; the run's fp32 matmul peaks (GFLOP/s).
SMOL_RUN, SMOL_MEASURED_S, SMOL_PEAKS, SMOL_MFU = Workload(40, 120, 3, 2), {0: 60.4, 8: 25.4}, (103e9, 134e9), 0.6

LORA, LORA_TOP, IA3, PT = Adapter("lora"), Adapter("lora", top_layers=TOP), Adapter("ia3"), Adapter("prompt_tuning")


def gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


def mb(x: float) -> str:
    return f"{x / 1e6:,.2f} MB"


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def params_table(archs: dict[str, Arch]) -> list[str]:
    out = [row("base", "parameters", "in nn.Linear (lm_head once)", "bf16 weights", "fp32 weights"),
           row("---", "---:", "---:", "---:", "---:")]
    for name, a in archs.items():
        out.append(row(name, f"{total_params(a):,}", f"{linear_params(a):,}", gb(base_bytes(a, 2)),
                       gb(base_bytes(a, 4))))
    return out


def adapter_table(name: str, a: Arch) -> list[str]:
    out = [row(f"{name} adapter", "parameters", "fp32 file", "bf16 file", "bf16 data", "training state (16 B/param)"),
           row("---", "---:", "---:", "---:", "---:", "---:")]
    for label, ad in (("LoRA r=8 q,v", LORA), (f"LoRA r=8 q,v, top {TOP} layers", LORA_TOP),
                      ("IA3 (k, v, down)", IA3), ("prompt tuning, 8 tokens", PT)):
        data, _ = safetensors_bytes(adapter_tensors(a, ad), 2)
        out.append(row(label, f"{adapter_params(a, ad):,}", f"{adapter_file_bytes(a, ad, 4):,} B",
                       f"{adapter_file_bytes(a, ad, 2):,} B", f"{data:,} B", f"{adapter_train_bytes(a, ad):,} B"))
    return out


def fit_tokens_per_forward(a: Arch, top: int, users: int, w: Workload) -> tuple[int, int]:
    """(largest --tokens-per-forward of TPF_CHOICES whose activations fit one GPU beside the bf16 base,
    the users' training state and the reserve; its activation bytes). The chunk's target tokens are
    its share of the workload's."""
    free = GPU_BYTES - GPU_RESERVE - base_bytes(a, 2) - users * adapter_train_bytes(a, Adapter("lora", top_layers=top))
    best = (0, 0)
    for tpf in TPF_CHOICES:
        act = activation_bytes(a, tpf, tpf * w.targets_per_item // w.tokens_per_item, top)
        if act <= free:
            best = (tpf, act)
    return best


def memory_table(a: Arch, users: int = 16) -> list[str]:
    base = base_bytes(a, 2)
    out = [row("one H200 (141 GB), Llama-2-7B bf16", "bytes"), row("---", "---:"),
           row("base weights (bf16)", gb(base)), row("reserve (CUDA context, workspaces, fragmentation)", gb(GPU_RESERVE))]
    for top in (0, TOP):
        where = "every layer" if not top else f"top {top} layers"
        out.append(row(f"training state of {users} users (LoRA q,v, {where})",
                       mb(users * adapter_train_bytes(a, Adapter("lora", top_layers=top)))))
        for tpf in (4096, 8192, 16384):
            act = activation_bytes(a, tpf, tpf * PAPER.targets_per_item // PAPER.tokens_per_item, top)
            out.append(row(f"activations, --tokens-per-forward {tpf}, LoRA on {where}", gb(act)))
        tpf, act = fit_tokens_per_forward(a, top, users, PAPER)
        out.append(row(f"largest --tokens-per-forward that fits ({where})", f"{tpf:,} ({gb(act)})"))
    reuse = prefix_reuse_max_tokens(a)
    out.append(row("frozen-prefix reuse budget (engine: 2 GiB per trainer)", f"{reuse:,} tokens = "
                   f"{reuse // (PAPER.items * PAPER.tokens_per_item)} users of 100 items, "
                   f"{reuse // (SMALL.items * SMALL.tokens_per_item)} of 32"))
    cache = users * PAPER.items * PAPER.tokens_per_item * a.hidden * 4  # as the engine counts it
    out.append(row(f"frozen-prefix cache of {users} users of 100 items (needs a larger budget)", gb(cache)))
    step = BATCH_SIZE * PAPER.tokens_per_item
    out.append(row(f"users whose step ({BATCH_SIZE} rows x {PAPER.tokens_per_item} tokens) fills a 16,384-token chunk",
                   f"{-(-16384 // step)}"))
    for rows in (USERS_PER_GENERATE, 256):
        out.append(row(f"serving: KV cache, {rows} rows x {SERVE_TOKENS} positions",
                       gb(kv_cache_bytes(a, rows * SERVE_TOKENS))))
    resident = adapter_params(a, LORA) * 4  # the engine's banks hold adapters in fp32
    free = GPU_BYTES - GPU_RESERVE - base - kv_cache_bytes(a, USERS_PER_GENERATE * SERVE_TOKENS)
    out += [row("serving: one LoRA q,v user in the engine's banks (fp32)", mb(resident)),
            row(f"serving: LoRA q,v users resident beside {USERS_PER_GENERATE} rows' KV", f"{int(free // resident):,}"),
            row(f"serving: IA3 users resident beside {USERS_PER_GENERATE} rows' KV", f"{int(free // (adapter_params(a, IA3) * 4)):,}")]
    return out


def throughput_table(a: Arch) -> list[str]:
    out = [row("Llama-2-7B, LoRA r=8 q,v", "TFLOP per user", "of it attention", "users/h per H200 @0.4",
               "@0.2", f"users/h, Ray {RAY_GPUS} x H200 @0.4"),
           row("---", "---:", "---:", "---:", "---:", "---:")]
    cases = [("100 items x 300 tok, 2 ep, every layer", PAPER, 0, None),
             (f"100 items, top {TOP} layers, bottom reused", PAPER, TOP, True),
             (f"100 items, top {TOP} layers, no reuse", PAPER, TOP, False),
             ("32 items x 300 tok, 2 ep, every layer", SMALL, 0, None),
             (f"32 items, top {TOP} layers, bottom reused", SMALL, TOP, True)]
    for label, w, top, reused in cases:
        f = train_flops(a, w, top, reused)
        uph = users_per_hour(f["total"], GPU_PEAK, GPU_MFU)
        out.append(row(label, f"{f['total'] / 1e12:,.1f}", f"{f['attention'] / f['total']:.1%}", f"{uph:,.0f}",
                       f"{users_per_hour(f['total'], GPU_PEAK, GPU_MFU_LOW):,.0f}", f"{RAY_GPUS * uph:,.0f}"))
    return out


def smollm2_table() -> list[str]:
    out = [row("SmolLM2, 40 items x 120 tok, 2 ep, LoRA q,v", "GFLOP per user (benchmark count)", "+ attention",
               "predicted s/user @0.6 of 103-134 GFLOP/s", "measured s/user", "measured / predicted"),
           row("---", "---:", "---:", "---:", "---:", "---:")]
    for top in (0, TOP):
        f = train_flops(SMOLLM2, SMOL_RUN, top)
        lo, hi = (f["benchmark"] / (p * SMOL_MFU) for p in sorted(SMOL_PEAKS, reverse=True))
        m = SMOL_MEASURED_S[top]
        out.append(row("every layer" if not top else f"top {top} layers, bottom reused", f"{f['benchmark'] / 1e9:,.0f}",
                       f"{f['attention'] / f['benchmark']:.1%}", f"{lo:.1f}-{hi:.1f}", m,
                       f"{m / hi:.2f}-{m / lo:.2f}"))
    return out


def tables() -> str:
    parts = [params_table({"Llama-2-7B": LLAMA2_7B, "SmolLM2-135M": SMOLLM2}), adapter_table("Llama-2-7B", LLAMA2_7B),
             adapter_table("SmolLM2", SMOLLM2), memory_table(LLAMA2_7B), throughput_table(LLAMA2_7B), smollm2_table()]
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def main() -> None:
    print(tables(), end="")


if __name__ == "__main__":
    main()
