"""Many users at once: batched training of many users' PEFT modules, mixed-adapter inference.

The paper trains and serves one user at a time. Here one shared frozen base carries many users'
LoRA / IA3 / prompt-tuning modules side by side (stacked per-user tensors, a user slot per batch
row), read from and written to the standard PEFT adapter format.

    layers.py  MultiUserLinear: a wrapped nn.Linear with stacked LoRA/IA3 tensors, RowContext
    model.py   MultiUserModel: slots, PEFT-format load/save, prompt-tuning prefix, wrap/unwrap
    train.py   train_users / MultiUserTrainer / StackedAdamW: batched training == train_user per user
    infer.py   generate_mixed / generate_with / greedy_rows: one batch, one adapter (or none) per row

    from oppu.multi import train_users, generate_mixed
    losses = train_users(base, tok, {"u1": exs1, "u2": exs2}, pcfg, ucfg, seed=0, save_root=out_dir)
    texts = generate_mixed(base, tok, prompts, ["u1", None, "u2"], {"u1": d1, "u2": d2}, max_new_tokens=8)
"""
from oppu.multi.infer import generate_mixed, generate_with, greedy_rows
from oppu.multi.layers import MultiUserLinear, RowContext
from oppu.multi.model import MultiUserModel, read_adapter
from oppu.multi.train import MultiUserTrainer, StackedAdamW, train_users

__all__ = ["MultiUserModel", "MultiUserLinear", "RowContext", "read_adapter", "train_users", "MultiUserTrainer",
           "StackedAdamW", "generate_mixed", "generate_with", "greedy_rows"]
