"""`oppu serve` and `oppu user ...`: run the adapter service; manage users straight in the store.

    OPPU_ADMIN_TOKEN=... oppu serve --store var/oppu --base tiny --task LaMP_2M --port 8000
    oppu user create --store var/oppu            # {"user_id": ..., "token": ...} (token shown once)
    oppu user token --store var/oppu USER_ID     # a fresh token (--revoke: the old ones stop working)
    oppu user list --store var/oppu
    oppu user versions --store var/oppu USER_ID  # every version: active? intact?
    oppu user rollback --store var/oppu USER_ID 1
    oppu user import --store var/oppu user.oppu [--user-id ID]   # passphrase: prompt, or OPPU_PASSPHRASE
    oppu user delete --store var/oppu USER_ID --yes

Also runnable as `python -m oppu.cli_serve serve ...`. The `user` commands open the store
directly (SQLite WAL; safe beside a running server); with a server running prefer its API for
deletes, which also drops the adapter from the serving model at once (the server otherwise
notices on the user's next request; a rollback too). `user import` runs every check of an
import but the one that needs the base (that the adapter loads on it); with a server running,
POST /v1/users/import runs that one as well.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

import typer

user_app = typer.Typer(no_args_is_help=True, help="Create users, issue tokens, list and delete users in a store.")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _admin_token(token_file: Optional[Path]) -> str:
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            _fail(f"cannot read --admin-token-file {token_file}: {e}")
    else:
        token = os.environ.get("OPPU_ADMIN_TOKEN", "").strip()
    if not token:
        _fail("no admin token: set OPPU_ADMIN_TOKEN or pass --admin-token-file FILE")
    if len(token) < 16:
        _fail("the admin token must be at least 16 characters "
              "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def serve(store: Path = typer.Option(..., help="store directory (created if missing)"),
          base: str = typer.Option("tiny", help="'tiny' / 'tiny:micro|small' (built once into the store; for "
                                                "trying the API), 'smollm2', a .gguf file, a local HF model dir, "
                                                "or an `oppu run` output"),
          task: str = typer.Option("LaMP_2M", help="the LaMP task this server serves"),
          host: str = typer.Option("127.0.0.1", help="bind address (put TLS in front for anything but loopback)"),
          port: int = typer.Option(8000, help="port; 0 = any free port (see --port-file)"),
          port_file: Optional[Path] = typer.Option(None, help="write the bound port here once serving"),
          admin_token_file: Optional[Path] = typer.Option(None, help="file holding the admin token "
                                                                     "(else env OPPU_ADMIN_TOKEN)"),
          peft: str = typer.Option("lora", help="lora | prompt_tuning | ia3"),
          k: int = typer.Option(2, help="retrieved history items per prompt"),
          seed: int = typer.Option(0),
          max_len: int = typer.Option(256, help="prompt tokens"),
          user_epochs: Optional[int] = typer.Option(None, help="per-user training epochs"),
          user_lr: Optional[float] = typer.Option(None, help="per-user learning rate"),
          replay: float = typer.Option(0.5, help="incremental updates: fraction of older items replayed"),
          base_epochs: int = typer.Option(3, help="--base tiny: task-adaptation epochs on the built-in world"),
          trainer_base: str = typer.Option("auto", help="copy (trainer owns a copy of the base; training never "
                                                        "blocks generation) | shared | auto (copy below 1B params)"),
          max_batch: int = typer.Option(32, help="rows per mixed-adapter generation batch"),
          max_wait_ms: float = typer.Option(10.0, help="how long a batch waits for more requests"),
          train_yield_ms: float = typer.Option(500.0, help="the most a training step waits while generate "
                                                            "requests are open (generation goes first)"),
          instant: str = typer.Option("auto", help="instant adapters for users with history and no trained "
                                                   "version: auto (when --base is an `oppu run` output that "
                                                   "built an instant bank) | on (tiny: build a bank from the "
                                                   "built-in world) | off"),
          instant_bank_users: int = typer.Option(16, help="--base tiny --instant on: bank modules to train"),
          max_history_items: int = typer.Option(20_000, help="per-user quota of history items"),
          max_history_bytes: int = typer.Option(32 << 20, help="per-user quota of history bytes (item JSON)"),
          device: str = typer.Option("cpu", help="cpu | cuda | auto"),
          dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16"),
          threads: int = typer.Option(0, help="torch CPU threads (0 = torch's default)"),
          log_level: str = typer.Option("info", help="debug | info | warning"),
          access_log: bool = typer.Option(False, help="log every request (paths carry user ids)")):
    """Serve the personal adapter API (FastAPI; OpenAPI spec at /openapi.json). Needs the `serve` extra."""
    try:
        import uvicorn  # noqa: F401  (checked here: the serve extra may be missing)
    except ImportError:
        _fail("the server needs the serve extra: pip install -e '.[serve]'")
    import torch

    from oppu.server import ServeConfig, Service, create_app, open_base
    from oppu.store import AdapterStore

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = _admin_token(admin_token_file)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        run_cfg = _run_config(base, user_epochs, user_lr)
        cfg = ServeConfig(task=task, peft=peft, k=k, seed=seed, max_len=max_len, user_train=run_cfg.user_train,
                          replay=replay, trainer_base=trainer_base, max_batch=max_batch, max_wait_ms=max_wait_ms,
                          train_yield_ms=train_yield_ms, style=run_cfg.prompt_style, max_history_items=max_history_items,
                          max_history_bytes=max_history_bytes)
        st = AdapterStore(store)
        model, tok, info = open_base(base, cfg.task, st.root, seed=seed, base_epochs=base_epochs, k=k,
                                     max_len=max_len, device=device, dtype=dtype, instant=instant,
                                     user_train=cfg.user_train, peft=peft, instant_bank_users=instant_bank_users)
        bank = info.pop("instant", None)
        svc = Service(st, model, tok, cfg, token, info, instant=bank)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    app = create_app(svc)
    sock = _bind(host, port, port_file)
    logging.getLogger("oppu.server").info("serving %s on http://%s:%d (base %s, trainer base: %s, instant: %s)",
                                          svc.task.id, host, sock.getsockname()[1], info.get("path", base),
                                          svc.trainer_base, bank.describe() if bank else "off")
    _run(app, svc, sock, log_level, access_log)


def _run_config(base: str, epochs: Optional[int], lr: Optional[float]):
    """The run config's per-base defaults (tiny, or the paper's recipe for a checkpoint; an `oppu run`
    output: its base's) with --user-epochs / --user-lr applied when given: the server trains as
    `oppu run` does."""
    from oppu.server.bases import serve_run_config

    return serve_run_config(base, **{"user_train.epochs": epochs, "user_train.lr": lr})


def _bind(host: str, port: int, port_file: Optional[Path]) -> socket.socket:
    """A socket bound to host:port (port 0: any free one); the bound port goes to port_file."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        _fail(f"cannot bind {host}:{port}: {e}")
    bound = sock.getsockname()[1]
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(bound))
        tmp.replace(port_file)  # readers never see a half-written port
    return sock


def _run(app, svc, sock: socket.socket, log_level: str, access_log: bool) -> None:
    """uvicorn on the bound socket until it stops; then exit at once if a training thread is busy."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level.lower(), access_log=access_log,
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    if svc.worker.current:
        # A training thread still inside torch would abort the interpreter's shutdown; leave now.
        # The store is consistent (a version is published atomically or not at all).
        logging.shutdown()
        os._exit(0)


@user_app.command("create")
def user_create(store: Path = typer.Option(..., help="store directory")):
    """A new user with a random id and a token (printed once as JSON; stored hashed)."""
    from oppu.store import AdapterStore
    with AdapterStore(store) as st:
        uid = st.new_user()
        print(json.dumps({"user_id": uid, "token": st.tokens.issue(uid)}))


@user_app.command("token")
def user_token(user_id: str = typer.Argument(...), store: Path = typer.Option(..., help="store directory"),
               revoke: bool = typer.Option(False, help="revoke the user's existing tokens first")):
    """Issue a new token for a user (e.g. a lost one); --revoke invalidates the old ones."""
    from oppu.store import AdapterStore, StoreError
    with AdapterStore(store) as st:
        try:
            revoked = st.tokens.revoke(user_id) if revoke else 0
            print(json.dumps({"user_id": user_id, "token": st.tokens.issue(user_id), "revoked": revoked}))
        except StoreError as e:
            _fail(str(e))


@user_app.command("list")
def user_list(store: Path = typer.Option(..., help="store directory")):
    """One JSON line per user: task, active version, versions, history items."""
    from oppu.store import AdapterStore
    with AdapterStore(store) as st:
        for uid in st.users():
            info = st.user(uid)
            print(json.dumps({"user_id": uid, "task": info.task, "active_version": info.active_version,
                              "versions": [v.version for v in st.versions(uid)],
                              "history_items": st.count_history(uid)}))


@user_app.command("versions")
def user_versions(user_id: str = typer.Argument(...), store: Path = typer.Option(..., help="store directory")):
    """One JSON line per adapter version: active?, intact? (its files re-hashed), note, parent."""
    from oppu.store import AdapterStore, CorruptAdapterError, StoreError
    with AdapterStore(store) as st:
        try:
            active = st.active_version(user_id)
            for v in st.versions(user_id):
                try:
                    st.verify(user_id, v.version)
                    problem = None
                except CorruptAdapterError as e:
                    problem = f"file {e.file!r} {e.reason}"
                print(json.dumps({"version": v.version, "active": v.version == active, "intact": problem is None,
                                  "problem": problem, "created": v.created, "parent_version": v.parent_version,
                                  "note": v.note, "history_seq": v.history_seq}))
        except StoreError as e:
            _fail(str(e))


@user_app.command("rollback")
def user_rollback(user_id: str = typer.Argument(...), version: int = typer.Argument(..., help="an intact version"),
                  store: Path = typer.Option(..., help="store directory")):
    """Make an existing version active again after checking its files (a running server serves it
    from the user's next request)."""
    from oppu.store import AdapterStore, StoreError
    with AdapterStore(store) as st:
        try:
            st.verify(user_id, version)
            st.set_active(user_id, version)
            print(json.dumps({"user_id": user_id, "active_version": st.active_version(user_id)}))
        except StoreError as e:
            _fail(str(e))


@user_app.command("import")
def user_import(file: Path = typer.Argument(..., help="an export (POST /v1/users/{id}/adapter)"),
                store: Path = typer.Option(..., help="store directory"),
                user_id: Optional[str] = typer.Option(None, help="the new user's id (default: the exported one)"),
                passphrase_file: Optional[Path] = typer.Option(None, help="file holding the passphrase (one final "
                                                                          "newline is dropped, nothing else)")):
    """A new user from an encrypted export: its adapter as v1 (active), its history, and a token
    (printed once as JSON). The passphrase comes exactly as given: OPPU_PASSPHRASE, --passphrase-file,
    else a prompt."""
    from oppu.crypto import CryptoError
    from oppu.store import AdapterStore, StoreError
    from oppu.transfer import import_into, read_export

    try:
        blob = file.read_bytes()
    except OSError as e:
        _fail(f"cannot read {file}: {e}")
    secret = _passphrase(passphrase_file)
    with AdapterStore(store) as st:
        try:
            v = import_into(st, read_export(blob, secret, user_id=user_id))
            print(json.dumps({"user_id": v.user_id, "token": st.tokens.issue(v.user_id), "active_version": v.version,
                              "history_items": st.count_history(v.user_id)}))
        except (CryptoError, StoreError, ValueError) as e:
            _fail(str(e))


def _passphrase(passphrase_file: Optional[Path]) -> str:
    """The passphrase exactly as given (never trimmed; oppu.crypto NFC-normalizes it)."""
    if passphrase_file is not None:
        try:
            text = passphrase_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            _fail(f"cannot read --passphrase-file {passphrase_file}: {e}")
        return text[:-1] if text.endswith("\n") else text
    if "OPPU_PASSPHRASE" in os.environ:
        return os.environ["OPPU_PASSPHRASE"]
    return typer.prompt("passphrase", hide_input=True)


@user_app.command("delete")
def user_delete(user_id: str = typer.Argument(...), store: Path = typer.Option(..., help="store directory"),
                yes: bool = typer.Option(False, "--yes", help="confirm: everything of the user goes")):
    """Delete a user: history, adapter versions and files, jobs, tokens, caches (db scrubbed)."""
    from oppu.store import AdapterStore, StoreError
    if not yes:
        _fail("deleting a user cannot be undone; pass --yes")
    with AdapterStore(store) as st:
        try:
            report = st.delete_user(user_id)
            if not report["scrubbed"]:  # this process exits next: wait for readers (a server's) to let go
                report["scrubbed"] = st.scrubber.wait(report["scrub"], timeout=60)
            print(json.dumps(report))
        except StoreError as e:
            _fail(str(e))


app = typer.Typer(add_completion=False, no_args_is_help=True, help="oppu serve / oppu user (standalone entry).")
app.command()(serve)
app.add_typer(user_app, name="user")

if __name__ == "__main__":  # pragma: no cover
    app()
