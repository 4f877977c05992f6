"""The engine: everything in oppu that trains or generates goes through this package.

One shared frozen base carries many users' PEFT modules side by side (stacked per-user tensors,
one slot per batch row), for training (many users per pass, fresh or continued from a saved
version) and for KV-cached decoding of mixed batches. PEFT is the file format and the seeded
start state, never a second path.

    batching.py       encode / collate / the one truncation rule / batch plans
    layers.py         MultiUserLinear (a frozen linear + one part per PEFT type), RowContext
    lora.py, ia3.py, prompt_tuning.py   one file per PEFT type (layer part + bank)
    kinds.py          the registry of types; kind_of(config) refuses what the engine cannot run
    model.py          MultiUserModel: slots, users in and out, batch preparation
    format.py         PEFT files, seeded start state, peft_config
    optim.py          StackedAdamW and the learning-rate schedule, per slot
    train.py          Trainer / train_users (PEFT modules), train_full (every weight)
    merge.py          a LoRA merged into the base's weights (task adaptation)
    decode.py         generate / generate_mixed / greedy_rows
    cache.py          AdapterCache: byte-bounded LRU of adapter tensors
    serving.py        Slots: users kept loaded for serving (LRU), reloaded when their version changes

    from oppu.engine import train_users, generate_mixed
    losses = train_users(base, tok, {"u1": exs1, "u2": exs2}, pcfg, ucfg, seed=0, save_root=out_dir)
    texts = generate_mixed(base, tok, prompts, ["u1", None, "u2"], {"u1": d1, "u2": d2}, max_new_tokens=8)
"""
from oppu.engine.batching import Encoded, encode, tokenize_prompts
from oppu.engine.cache import AdapterCache
from oppu.engine.decode import generate, generate_mixed, greedy_rows
from oppu.engine.format import initial_module, n_layers_of, peft_config, read_adapter, user_seed, write_adapter
from oppu.engine.kinds import BANKS, kind_of
from oppu.engine.model import MultiUserModel
from oppu.engine.train import Trainer, train_full, train_users

__all__ = ["AdapterCache", "BANKS", "Encoded", "MultiUserModel", "Trainer", "encode", "generate", "generate_mixed",
           "greedy_rows", "initial_module", "kind_of", "n_layers_of", "peft_config", "read_adapter", "tokenize_prompts",
           "train_full", "train_users", "user_seed", "write_adapter"]
