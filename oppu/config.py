"""Run configuration: frozen dataclasses, mirrored by YAML files, overridden by CLI flags.

Defaults depend on the base: the paper's per-user setting (LoRA r=8 on q/v, lr ~1e-4) barely
moves a tiny from-scratch base, so `--base tiny` gets LoRA on all linear layers at a few e-3
(see docs/design.md). Every choice is a field here, never a constant in the code, and every
choice list (methods, PEFT types, retrievers, profiles, executors, trainer bases) is defined here once.

    cfg = RunConfig(task="LaMP_2M", data="data/LaMP_2M", out="runs/x")
    cfg = load_config("my.yaml", task="LaMP_4")     # YAML, then keyword overrides
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

TOKENS_PER_FORWARD = 1024  # batched training: padded tokens per forward; a step's rows go in length-sorted chunks

DEFAULT_METHODS = ("non_personalized", "rag", "pag", "oppu", "oppu_rag", "oppu_pag")   # what `oppu run` runs
ADAPTER_METHODS = ("oppu", "oppu_rag", "oppu_pag")   # the methods that plug in each user's trained module
# the methods that plug in each user's instant module, mixed from a bank of other users' (oppu.instant)
INSTANT_METHODS = ("instant", "instant_rag", "instant_pag")
METHODS = DEFAULT_METHODS + INSTANT_METHODS
USER_MODULE_METHODS = ADAPTER_METHODS + INSTANT_METHODS   # every method whose rows carry a user module
INSTANT_MIXES = ("knn", "uniform")
INSTANT_SELECTS = ("router", "grad", "loss", "tfidf")
PEFT_TYPES = ("lora", "prompt_tuning", "ia3")
RETRIEVERS = ("bm25", "dense", "recency")
PROFILES = ("auto", "statistical", "llm")
PROMPT_STYLES = ("compact", "full")
# per-user training, always through oppu.engine's batched trainer: in this process, in a process
# pool, or on a Ray cluster
EXECUTORS = ("batched", "local", "ray")
# the server's trainer: its own copy of the base (concurrent with serving), the serving base itself
TRAINER_BASES = ("auto", "copy", "shared")


@dataclass(frozen=True)
class BaseTrainConfig:
    """Task adaptation of the shared base on the non-test users. Defaults are the tiny base's;
    load_config applies CHECKPOINT_DEFAULTS for a real checkpoint unless a value is given."""
    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 32
    lora_r: int = 16            # real checkpoints: LoRA then merge; tiny: full training
    target_modules: str = "all-linear"   # real checkpoints' task-adaptation LoRA (comma list or all-linear)
    max_examples: int = 0       # 0 = all; caps examples per epoch (and those built: max_examples x epochs)
    top_layers: int = 0         # real checkpoints: LoRA on the last N decoder layers only (0 = all)
    warmup_ratio: float = 0.05
    # tokens per epoch (0 = no cap): above it, each epoch trains on a fresh seeded draw of examples that
    # holds about this many tokens. The tiny base trains ~10.7k tokens/s on 2 cores (numpy commits, 8
    # epochs, 4.87M tokens in 460 s), so 8 capped epochs take ~6.5 min however large the data; the
    # embedded worlds (205k-397k tokens per epoch) stay under it. Checkpoints cap examples instead.
    max_tokens: int = 524_288


@dataclass(frozen=True)
class UserTrainConfig:
    """One PEFT per user, trained on that user's history only (tiny-base defaults, see above)."""
    epochs: int = 4
    lr: float = 3e-3
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: str = "all-linear"   # or a comma list, e.g. "q_proj,v_proj" (the paper's)
    top_layers: int = 0                  # LoRA/IA3 on the last N decoder layers only (PEFT layers_to_transform; 0 = all)
    num_virtual_tokens: int = 8          # prompt tuning
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0            # share of each user's steps with linear warm-up (then cosine); 0 = constant
    max_grad_norm: float = 1.0           # per-user gradient clipping


@dataclass(frozen=True)
class InstantConfig:
    """Instant adapters (oppu.instant): a new user's module mixed from a bank of modules trained
    once on other (non-test) users: the bank modules that best explain the user's own latest items."""
    bank_users: int = 64                 # non-test users whose modules form the bank
    val_users: int = 16                  # other non-test users (not in the bank) that pick top_k/temperature
    val_items: int = 2                   # each validation user's last N items: held out, scored by loss
    top_k: tuple[int, ...] = (1, 4, 8, 16)                    # grid: bank modules mixed per user
    temperature: tuple[float, ...] = (0.01, 0.03, 0.1, 1.0)   # grid: softmax(affinity / temperature)
    mix: str = "knn"                     # knn (the top_k by affinity) | uniform (the whole bank, no user signal)
    # affinity of a bank module to a user: router (grad's ranking predicted from one forward's features,
    # learned on non-test users) | grad (cosine of its weight change with the user's probe items' descent
    # direction, one backward) | loss (the probe items' loss under it) | tfidf (history text cosine)
    select: str = "router"
    router_users: int = 256              # select=router: non-test users (outside val_users) it learns from
    router_min_agreement: float = 0.6    # below it (cross-validated top-k agreement with grad), rank by grad
    threads: int = 0                     # torch threads while writing modules; 0 = 1 under 20M parameters
    candidates: int = 16                 # select=loss: modules scored, the most similar histories (TF-IDF) first
    probe_items: int = 8                 # select=router|grad|loss: the user's most recent N items (plain prompt)

    def __post_init__(self) -> None:
        if self.mix not in INSTANT_MIXES:
            raise ValueError(f"unknown instant.mix {self.mix!r}; valid: {', '.join(INSTANT_MIXES)}")
        if self.select not in INSTANT_SELECTS:
            raise ValueError(f"unknown instant.select {self.select!r}; valid: {', '.join(INSTANT_SELECTS)}")
        if self.threads < 0:
            raise ValueError(f"instant.threads must be >= 0 (0 = automatic), got {self.threads}")
        if self.candidates < 1 or self.probe_items < 1 or self.router_users < 4:
            raise ValueError(f"instant: candidates and probe_items must be >= 1 and router_users >= 4 (got "
                             f"{self.candidates}, {self.probe_items}, {self.router_users})")
        if self.bank_users < 1 or self.val_users < 0 or self.val_items < 1:
            raise ValueError(f"instant: bank_users >= 1, val_users >= 0, val_items >= 1 (got {self.bank_users}, "
                             f"{self.val_users}, {self.val_items})")
        if not self.top_k or min(self.top_k) < 1 or not self.temperature or min(self.temperature) <= 0:
            raise ValueError(f"instant: top_k candidates must be >= 1 and temperatures > 0 (got {self.top_k}, "
                             f"{self.temperature})")


@dataclass(frozen=True)
class RunConfig:
    task: str = "LaMP_2M"
    data: str = ""                     # LaMP directory; "" = synthesize the embedded default world
    out: str = "runs/oppu"
    base: str = "tiny"                 # "tiny", a tiny preset name ("tiny:small"), or a local HF dir
    methods: tuple[str, ...] = DEFAULT_METHODS
    peft: str = "lora"
    retriever: str = "bm25"
    k: int = 2
    profile: str = "auto"
    test_users: int = 100
    eval_split: str = "dev"
    seed: int = 0
    dtype: str = "fp32"
    device: str = "cpu"
    prompt_style: str = "compact"      # "full" keeps LaMP's instruction (instruction-tuned bases)
    max_prompt_tokens: int = 384
    infer_batch_size: int = 32
    strict: bool = True
    cache_dir: str = ""                # "" = $OPPU_CACHE or ~/.cache/oppu
    executor: str = "batched"          # per-user training: batched | local | ray (EXECUTORS)
    workers: int = 2                   # processes / Ray tasks for executor local|ray
    ray_address: str = ""              # "" = a private local Ray; else e.g. "ray://head:10001"
    max_users_per_batch: int = 16      # users trained together by the batched trainer (batched|local|ray)
    tokens_per_forward: int = TOKENS_PER_FORWARD  # batched trainer: padded tokens per forward chunk
    users_per_generate: int = 32       # inference: users whose adapters are loaded at once (bounds memory)
    max_history_items: int = 0         # per-user training: the most recent N history items (0 = all)
    base_train: BaseTrainConfig = field(default_factory=BaseTrainConfig)
    user_train: UserTrainConfig = field(default_factory=UserTrainConfig)
    instant: InstantConfig = field(default_factory=InstantConfig)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown method(s) {bad or self.methods!r}; valid: {', '.join(METHODS)}")
        for name, val, valid in (("peft", self.peft, PEFT_TYPES), ("retriever", self.retriever, RETRIEVERS),
                                 ("profile", self.profile, PROFILES),
                                 ("prompt_style", self.prompt_style, PROMPT_STYLES),
                                 ("executor", self.executor, EXECUTORS)):
            if val not in valid:
                raise ValueError(f"unknown {name} {val!r}; valid: {', '.join(valid)}")
        counts = {"workers": self.workers, "max_users_per_batch": self.max_users_per_batch,
                  "tokens_per_forward": self.tokens_per_forward, "users_per_generate": self.users_per_generate}
        bad_counts = {k: v for k, v in counts.items() if v < 1}
        if bad_counts:
            raise ValueError(f"these must be >= 1: {bad_counts}")
        if self.max_history_items < 0:
            raise ValueError(f"max_history_items must be >= 0 (0 = all), got {self.max_history_items}")
        if self.k < 0 or self.test_users < 1:
            raise ValueError(f"k must be >= 0 and test_users >= 1 (got k={self.k}, test_users={self.test_users})")

    @property
    def is_tiny(self) -> bool:
        return is_tiny_base(self.base)

    @property
    def tiny_preset(self) -> str:
        return self.base.split(":", 1)[1] if self.base.startswith("tiny:") else "tiny"

    def cache_root(self) -> Path:
        import os
        return Path(self.cache_dir or os.environ.get("OPPU_CACHE") or Path.home() / ".cache" / "oppu")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = list(self.methods)
        return d


# Tested defaults per kind of base. The dataclass defaults are the tiny from-scratch base's: it
# needs many epochs to learn the task and LoRA on every linear layer at a few e-3 to move per user
# (measured on the LaMP_2M world: 3 base epochs left oppu at +0.00 accuracy over non_personalized,
# 8 gave +0.10 and oppu_rag +0.19). Real checkpoints get the paper's setting: LoRA r=8 on q,v at 1e-4.
# the paper's released settings: task adaptation LoRA r=8 on q,k,v (merged); per-user LoRA r=8
# (alpha 8) on q,v, lr 1e-4, 2 epochs, weight decay 0.01, warm-up 0.1, clip 0.3; the official
# LaMP instruction in the prompt (an instruct base reads it inside its chat template).
# Task adaptation of a checkpoint is capped at 512 examples per epoch (a seeded sample of the other
# users' items and questions): its cost no longer grows with the data (base_train.max_examples=0 lifts it).
CHECKPOINT_DEFAULTS = {"base_train.epochs": 2, "base_train.lr": 1e-4, "base_train.lora_r": 8,
                       "base_train.max_examples": 512, "base_train.max_tokens": 0,
                       "base_train.target_modules": "q_proj,k_proj,v_proj",
                       "user_train.epochs": 2, "user_train.lr": 1e-4, "user_train.lora_alpha": 8,
                       "user_train.target_modules": "q_proj,v_proj", "user_train.weight_decay": 0.01,
                       "user_train.warmup_ratio": 0.1, "user_train.max_grad_norm": 0.3, "prompt_style": "full"}


# Measured on SmolLM2-135M-Instruct (docs/results.md, LaMP_2M world, 8 test users, same base, task
# adaptation 1 epoch at lr 1e-3): the paper's per-user lr 1e-4 left oppu at non_personalized's
# accuracy; 1e-3 gave +0.21. So small checkpoints named here get that task adaptation and per-user
# lr on top of CHECKPOINT_DEFAULTS (a flag or YAML value still wins).
BASE_DEFAULTS = {"smollm2": {"base_train.epochs": 1, "base_train.lr": 1e-3, "user_train.lr": 1e-3}}


# `oppu demo`: a world and settings per kind of base that finish in minutes on 2 CPU cores.
# A checkpoint (SmolLM2-135M) costs ~100x the tiny base per token, so its world is small (4 test
# users, 8-12 items, each trained on their 8 most recent, 2 questions each), task adaptation is
# one pass over 64 examples with LoRA on
# the top 8 layers, and each user's LoRA sits on the top 8 layers too (the frozen layers below run
# once per example: engine/prefix.py). Measured in docs/results.md.
DEMO_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"world": {"test_users": 16, "other_users": 160}, "run": {}},
    "checkpoint": {
        "world": {"test_users": 4, "other_users": 16, "queries_per_user": 2, "min_history": 8, "max_history": 12},
        "run": {"profile": "statistical", "max_history_items": 8, "base_train.epochs": 1, "base_train.lr": 2e-3,
                "base_train.batch_size": 8, "base_train.max_examples": 64, "base_train.top_layers": 8,
                "base_train.target_modules": "q_proj,k_proj,v_proj,o_proj",
                "user_train.top_layers": 8, "user_train.lr": 2e-3}},
}


def is_tiny_base(spec: str) -> bool:
    """Whether a --base names the tiny from-scratch base ("tiny" or a preset, "tiny:small")."""
    return spec == "tiny" or spec.startswith("tiny:")


def demo_preset(base: str) -> dict[str, dict[str, Any]]:
    """The demo's world sizes and run overrides for `base` (tiny presets vs any checkpoint)."""
    return DEMO_PRESETS["tiny" if is_tiny_base(base) else "checkpoint"]


def _build(cls, data: dict[str, Any]):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid: {', '.join(known)}")
    kw = {}
    for k, v in data.items():
        if k == "base_train":
            v = _build(BaseTrainConfig, v or {})
        elif k == "user_train":
            v = _build(UserTrainConfig, v or {})
        elif k == "instant":
            v = _build(InstantConfig, {n: tuple(x) if isinstance(x, (list, tuple)) else (x,) if n in ("top_k", "temperature")
                                       else x for n, x in (v or {}).items()})
        elif k == "methods" and isinstance(v, str):
            v = tuple(m.strip() for m in v.split(",") if m.strip())
        elif k == "methods":
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """RunConfig from an optional YAML file, then keyword overrides (None values are ignored).
    Nested overrides use dotted keys: {"user_train.lr": 1e-3}."""
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data.update(loaded)
    for k, v in overrides.items():
        if v is None:
            continue
        if "." in k:
            group, key = k.split(".", 1)
            data.setdefault(group, {})
            data[group] = {**(data[group] or {}), key: v}
        else:
            data[k] = v
    base = str(data.get("base", "tiny"))
    if not is_tiny_base(base):
        for key, v in {**CHECKPOINT_DEFAULTS, **BASE_DEFAULTS.get(base, {})}.items():
            if "." not in key:
                data.setdefault(key, v)
                continue
            group, name = key.split(".")
            data.setdefault(group, {})
            data[group] = data[group] or {}
            data[group].setdefault(name, v)
    return _build(RunConfig, data)

