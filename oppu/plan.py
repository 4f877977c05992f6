"""Capacity planning on paper: parameters, adapter bytes, training FLOPs, memory and users/hour of
a Llama-style base with one PEFT module per user. Pure functions (no torch, no I/O); the figures
in docs/scaling.md are printed by `python -m oppu.plan_tables`, and tests/test_plan.py checks the
counts against real models, real PEFT modules and real saved adapter files.

    arch = arch_of(model.config)                          # or LLAMA2_7B, or Arch(...)
    total_params(arch), linear_params(arch)               # 134,515,008 / 134,479,872 for SmolLM2
    adapter_file_bytes(arch, Adapter("lora"), 2)          # bf16 adapter_model.safetensors size
    f = train_flops(arch, Workload(items=100, tokens_per_item=300, targets_per_item=8, epochs=2))
    users_per_hour(f["total"], peak=989e12, mfu=0.4)
"""
from __future__ import annotations

import json
from dataclasses import dataclass

# The engine's limit on cached frozen-prefix hidden states per trainer (oppu/engine/prefix.py; the
# test checks they agree): reuse is off when tokens * hidden * 4 bytes exceeds it.
PREFIX_BUDGET_BYTES = 2 << 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SAFETENSORS_DTYPE = {4: "F32", 2: "BF16"}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
IA3_TARGETS, IA3_FEEDFORWARD = ("k_proj", "v_proj", "down_proj"), ("down_proj",)


@dataclass(frozen=True)
class Arch:
    """A Llama-style decoder: RMSNorm (weight only), rotary positions, gated SiLU MLP."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0            # 0 = hidden // heads
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)


# Llama-2-7B's config.json (the paper's base), written out: no model hub is reachable here.
LLAMA2_7B = Arch(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, tied=False)
LLAMA2_7B_PARAMS = 6_738_415_616


def arch_of(config) -> Arch:
    """An Arch from a transformers LlamaConfig (or anything with its field names), or an Arch as is."""
    if isinstance(config, Arch):
        return config
    c = config
    return Arch(hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers,
                heads=c.num_attention_heads, kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                vocab=c.vocab_size, tied=bool(getattr(c, "tie_word_embeddings", False)),
                head_dim=getattr(c, "head_dim", None) or 0, attention_bias=bool(getattr(c, "attention_bias", False)),
                mlp_bias=bool(getattr(c, "mlp_bias", False)))


def linear_shapes(arch: Arch) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each nn.Linear of one decoder layer."""
    h, i, q, kv = arch.hidden, arch.intermediate, arch.q_dim, arch.kv_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def layer_linear_params(arch: Arch) -> int:
    return sum(a * b for a, b in linear_shapes(arch).values())


def total_params(arch: Arch) -> int:
    """Every parameter: embeddings, decoder layers (weights, biases, two RMSNorms), final norm, lm_head
    (counted once when tied to the embeddings)."""
    s = linear_shapes(arch)
    bias = (sum(s[m][1] for m in ATTN) if arch.attention_bias else 0) + \
           (sum(s[m][1] for m in MLP) if arch.mlp_bias else 0)
    layer = layer_linear_params(arch) + bias + 2 * arch.hidden
    embed = arch.vocab * arch.hidden
    return embed + arch.layers * layer + arch.hidden + (0 if arch.tied else embed)


def linear_params(arch: Arch) -> int:
    """Weights of every nn.Linear, lm_head included once (benchmarks/_common.py `matmul_params`)."""
    return arch.layers * layer_linear_params(arch) + arch.vocab * arch.hidden


@dataclass(frozen=True)
class Adapter:
    """One user's PEFT module as oppu builds it (oppu.engine.format.peft_config)."""
    kind: str = "lora"                            # lora | ia3 | prompt_tuning
    r: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # LoRA; ("all-linear",) = every decoder linear
    top_layers: int = 0                           # 0 = every layer
    virtual_tokens: int = 8


def adapted_layers(arch: Arch, top_layers: int) -> range:
    return range(arch.layers - top_layers if top_layers else 0, arch.layers)


def adapter_tensors(arch: Arch, ad: Adapter) -> dict[str, tuple[int, ...]]:
    """{name: shape} as PEFT's save_pretrained writes them into adapter_model.safetensors."""
    if ad.kind == "prompt_tuning":
        return {"prompt_embeddings": (ad.virtual_tokens, arch.hidden)}
    if ad.kind not in ("lora", "ia3"):
        raise ValueError(f"unknown PEFT type {ad.kind!r}; valid: lora, ia3, prompt_tuning")
    shapes = linear_shapes(arch)
    targets = IA3_TARGETS if ad.kind == "ia3" else (tuple(shapes) if ad.targets == ("all-linear",) else ad.targets)
    bad = [t for t in targets if t not in shapes]
    if bad:
        raise ValueError(f"unknown target module(s) {bad}; valid: {', '.join(shapes)} or all-linear")
    out = {}
    for n in adapted_layers(arch, ad.top_layers):
        for t in targets:
            p = f"base_model.model.model.layers.{n}.{'self_attn' if t in ATTN else 'mlp'}.{t}"
            fan_in, fan_out = shapes[t]
            if ad.kind == "lora":
                out[f"{p}.lora_A.weight"], out[f"{p}.lora_B.weight"] = (ad.r, fan_in), (fan_out, ad.r)
            else:  # IA3 scales the output of k/v, the input of the feed-forward down_proj
                out[f"{p}.ia3_l"] = (1, fan_in) if t in IA3_FEEDFORWARD else (fan_out, 1)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def adapter_params(arch: Arch, ad: Adapter) -> int:
    return sum(_numel(s) for s in adapter_tensors(arch, ad).values())


def safetensors_bytes(tensors: dict[str, tuple[int, ...]], dtype_bytes: int) -> tuple[int, int]:
    """(data bytes, whole-file bytes) of safetensors' save_file with metadata {"format": "pt"}: an
    8-byte length, the compact JSON header (tensors in name order, as the library sorts them
    within one dtype) padded with spaces to a multiple of 8, then the data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        size = _numel(tensors[name]) * dtype_bytes
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype_bytes], "shape": list(tensors[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":")))
    return offset, 8 + text + (-text) % 8 + offset


def adapter_file_bytes(arch: Arch, ad: Adapter, dtype_bytes: int) -> int:
    """Bytes of the user's adapter_model.safetensors (adapter_config.json adds ~0.5-1.2 KB)."""
    return safetensors_bytes(adapter_tensors(arch, ad), dtype_bytes)[1]


@dataclass(frozen=True)
class Workload:
    """One user's training: history items, tokens per item (prompt + target), of which targets."""
    items: int
    tokens_per_item: int
    targets_per_item: int
    epochs: int = 2


def attention_flops(arch: Arch, seq_len: int, n_layers: int) -> int:
    """Forward FLOPs of causal attention's scores (Q K^T) and weighted values (P V) for one sequence
    over n_layers: query i meets i+1 keys, 2 FLOPs per multiply-add, twice (scores, values)."""
    return n_layers * 2 * arch.q_dim * seq_len * (seq_len + 1)


def train_flops(arch: Arch, w: Workload, top_layers: int = 0, reused: bool | None = None) -> dict[str, int]:
    """FLOPs to train one user's module on a frozen base (no weight gradients).

    `benchmark` is benchmarks/train_users.py's `needed_flops` (its `mfu`) exactly:
      epochs * (4 * N_top * T + 4 * N_head * targets) + (1 if reused else epochs) * 2 * N_below * T
    with T, targets the tokens and target tokens of one epoch, N_top / N_below the linear weights of
    the adapted layers / the frozen layers below the lowest one, N_head the lm_head (run at target
    positions only). `total` adds attention scores and values, which the benchmark leaves out:
    forward in every layer, and twice that again (input gradients of Q, K, V) in the adapted layers.
    `reused`: the engine caches the bottom layers' hidden states after epoch 1 (default: when
    top_layers and 2+ epochs; it also needs the budget, see prefix_reuse_max_tokens)."""
    top_n = len(adapted_layers(arch, top_layers))
    below_n = arch.layers - top_n
    if reused is None:
        reused = bool(top_layers) and w.epochs >= 2
    t, targets, per = w.items * w.tokens_per_item, w.items * w.targets_per_item, layer_linear_params(arch)
    below_passes = 1 if (reused and below_n) else w.epochs
    parts = {"adapted_layers": w.epochs * 4 * top_n * per * t, "head": w.epochs * 4 * arch.vocab * arch.hidden * targets,
             "below": below_passes * 2 * below_n * per * t}
    parts["benchmark"] = sum(parts.values())
    attn_top = w.epochs * 3 * w.items * attention_flops(arch, w.tokens_per_item, top_n)
    attn_below = below_passes * w.items * attention_flops(arch, w.tokens_per_item, below_n)
    parts["attention"] = attn_top + attn_below
    parts["total"] = parts["benchmark"] + parts["attention"]
    return parts


def users_per_hour(flops_per_user: float, peak: float, mfu: float) -> float:
    """3600 * peak * mfu / flops_per_user: users trained per hour by one device."""
    return 3600 * peak * mfu / flops_per_user


def base_bytes(arch: Arch, dtype_bytes: int) -> int:
    return total_params(arch) * dtype_bytes


def activation_bytes(arch: Arch, tokens: int, targets: int, top_layers: int = 0, dtype_bytes: int = 2) -> int:
    """Rough memory autograd holds for one forward chunk of `tokens` padded tokens (a training batch
    of users, cut by --tokens-per-forward), per adapted layer and token: the inputs of both RMSNorms
    and their outputs (4h), Q and attention output (2 q_dim), K and V (2 kv_dim), the MLP's gate,
    up, SiLU and product (4 i), in the base dtype; attention stores no L x L scores (a fused/flash
    kernel); plus the logits at target positions in the dtype and fp32 (loss) for the lm_head.
    Frozen layers below the lowest adapted one run without autograd and keep nothing."""
    per_token = 4 * arch.hidden + 2 * arch.q_dim + 2 * arch.kv_dim + 4 * arch.intermediate
    layers = len(adapted_layers(arch, top_layers))
    return tokens * layers * per_token * dtype_bytes + targets * arch.vocab * (dtype_bytes + 4)


def adapter_train_bytes(arch: Arch, ad: Adapter) -> int:
    """One user's module while training: fp32 weights, gradients, AdamW's two moments (16 B/param;
    the engine keeps adapters in fp32 on a bf16 base, as PEFT does)."""
    return 16 * adapter_params(arch, ad)


def kv_cache_bytes(arch: Arch, tokens: int, dtype_bytes: int = 2) -> int:
    """KV cache of `tokens` cached positions (all rows of a decode batch together)."""
    return 2 * arch.layers * arch.kv_dim * dtype_bytes * tokens


def prefix_reuse_max_tokens(arch: Arch, budget: int = PREFIX_BUDGET_BYTES) -> int:
    """Most training tokens (all users of one trainer, one epoch) whose bottom-layer hidden states the
    engine will cache (it counts 4 bytes per element)."""
    return budget // (arch.hidden * 4)


def resident_adapters(free_bytes: int, per_adapter: int) -> int:
    return max(0, free_bytes // per_adapter)
