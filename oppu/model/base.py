"""Load a base causal LM from a local directory; build the embedded tiny base.

`load_base(path)` is the one loading path (the pipeline, the server and the scale-out workers
all load through it): `AutoModelForCausalLM.from_pretrained(local_dir)` and
`AutoTokenizer.from_pretrained(local_dir)`, with the network disabled, so a Llama-2-7B or Qwen
directory works unchanged. `build_tiny_base(corpus, out_dir)` makes the embedded default: a
byte-level BPE tokenizer trained locally on the corpus by `tokenizers`, a small Llama model
initialised from a config, both saved with `save_pretrained` and then loaded back by
`load_base`, the same way a real checkpoint is.

    tok_dir = build_tiny_base(texts, "cache/tiny-LaMP_2M", preset="tiny")
    model, tok = load_base(tok_dir)
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: every model is a local directory
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import warnings  # noqa: E402

# PEFT 0.21 calls a transformers-5 property deprecated for v6: a warning per adapter, nothing to act on
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
hf_logging.disable_progress_bar()  # oppu shows its own progress; HF's per-shard bars are noise
hf_logging.set_verbosity_error()


@dataclass(frozen=True)
class TinyPreset:
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 1024


PRESETS = {
    "tiny": TinyPreset(),
    "small": TinyPreset(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                        num_attention_heads=8),
    "micro": TinyPreset(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=512),
}
SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on the corpus; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer=trainer)
    bos = tk.token_to_id(SPECIAL["bos"])
    tk.post_processor = processors.TemplateProcessing(single=f"{SPECIAL['bos']} $A",
                                                      special_tokens=[(SPECIAL["bos"], bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"], padding_side="left")


def build_tiny_base(corpus: Iterable[str], out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Train a tokenizer on `corpus`, initialise a Llama from the preset, save both to out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; valid: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out_dir)
    tok = train_tokenizer(corpus, p.vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                      num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
                      num_key_value_heads=p.num_attention_heads,
                      max_position_embeddings=p.max_position_embeddings, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "oppu_tiny.json").write_text(str(asdict(p)))
    return out


def resolve_dtype(dtype: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; valid: fp32, bf16, fp16")
    return table[dtype]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return device


def load_tokenizer(path: str | Path):
    """The tokenizer of a local model dir, set up the one way oppu uses it: left padding, a pad
    token, and `oppu_chat` (prompts go through its chat template) when it has one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:  # Llama-2 and friends ship without a pad token
        tok.pad_token = tok.eos_token
    tok.oppu_chat = bool(getattr(tok, "chat_template", None))
    if tok.oppu_chat:
        tok.oppu_end_id = end_of_turn(tok)
    return tok


def end_of_turn(tok) -> int:
    """The special token a chat template closes an assistant turn with (SmolLM2 <|im_end|>, Llama-3
    <|eot_id|>), read off the template itself; EOS when the template shows none."""
    mark = "Zq7xW"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                       tokenize=False)
    except Exception:  # a template that refuses this conversation: fall back to EOS
        return tok.eos_token_id
    after = text.split(mark, 1)[1] if mark in text else ""
    ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids and ids[0] in set(tok.all_special_ids) else tok.eos_token_id


def load_base(path: str | Path, dtype: str = "fp32", device: str = "cpu"):
    """Load (model, tokenizer) from a local Hugging Face directory. Never downloads."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json); "
                                "pass --base tiny or a local checkpoint directory")
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), local_files_only=True)
    model.to(resolve_device(device))
    model.eval()
    model.name_or_path = str(path)  # adapters record where their base lives
    return model, tok


def resolve_base_path(spec: str | Path, cache_root: str | Path | None = None) -> Path:
    """The local HF dir for `--base spec`: a HF model dir as is; `smollm2` or a .gguf file
    materialized once into cache_root/models/ (oppu.model.gguf); an `oppu run` output dir or its
    run.json resolve to the base it recorded."""
    import json
    import os

    if str(spec) == "smollm2" or str(spec).endswith(".gguf"):
        from oppu.model.gguf import materialize
        root = cache_root or os.environ.get("OPPU_CACHE") or Path.home() / ".cache" / "oppu"
        return materialize(str(spec), root)
    p = Path(spec)
    run_json = p if p.name == "run.json" else p / "run.json"
    if (p / "config.json").exists():
        return p
    if run_json.is_file():
        path = (json.loads(run_json.read_text()).get("base") or {}).get("path")
        if not path or not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"{run_json} records base path {path!r}, which is not a model directory "
                                    "(was the cache cleaned? rerun `oppu run`)")
        return Path(path)
    raise FileNotFoundError(f"--base {spec!r}: not 'tiny', 'tiny:<preset>', 'smollm2', a .gguf file, a Hugging "
                            "Face model directory (config.json) nor an `oppu run` output (run.json)")
