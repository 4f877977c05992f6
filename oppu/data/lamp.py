"""Read, validate and write the official LaMP files, exactly as published.

Files (formats and scoring rules: docs/lamp.md):
  {split}_questions.json  [{"id", "input", "profile": [item, ...], "user_id"?}, ...]
  {split}_outputs.json    {"task": "LaMP_N", "golds": [{"id", "output"}, ...]}

Every problem is a `LampFormatError` naming the file, the record and the field. In lenient
mode bad records are skipped, counted and returned in a `Problems` list instead: never dropped
silently.

    from oppu.data.lamp import read_questions, read_outputs
    qs, problems = read_questions("LaMP_4/dev_questions.json", task="LaMP_4")
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_IDS: tuple[str, ...] = ("LaMP_1", "LaMP_2N", "LaMP_2M", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7")

# Fields each profile item of a task must carry (besides "id"; "date" is optional everywhere).
ITEM_FIELDS: dict[str, tuple[str, ...]] = {
    "LaMP_1": ("title", "abstract"),
    "LaMP_2N": ("text", "title", "category"),
    "LaMP_2M": ("description", "tag"),
    "LaMP_3": ("text", "score"),
    "LaMP_4": ("text", "title"),
    "LaMP_5": ("abstract", "title"),
    "LaMP_7": ("text",),
}

# Older LaMP releases name the tasks LaMP_2 (news) with "LaMP_2" ids; accept common aliases.
TASK_ALIASES = {"lamp_1": "LaMP_1", "lamp_2n": "LaMP_2N", "lamp_2m": "LaMP_2M", "lamp_3": "LaMP_3",
                "lamp_4": "LaMP_4", "lamp_5": "LaMP_5", "lamp_7": "LaMP_7", "1": "LaMP_1",
                "2n": "LaMP_2N", "2m": "LaMP_2M", "3": "LaMP_3", "4": "LaMP_4", "5": "LaMP_5", "7": "LaMP_7"}


class LampFormatError(ValueError):
    """A LaMP file that does not follow the published format. The message names file, record, field."""


def canonical_task(task: str) -> str:
    """'lamp_2m', '2M', 'LaMP_2M' -> 'LaMP_2M'. Unknown names raise with the valid choices."""
    if task in TASK_IDS:
        return task
    key = task.strip().lower().replace("-", "_")
    if key in TASK_ALIASES:
        return TASK_ALIASES[key]
    raise ValueError(f"unknown LaMP task {task!r}; valid: {', '.join(TASK_IDS)}")


@dataclass(frozen=True)
class Question:
    """One record of {split}_questions.json."""
    id: str
    input: str
    profile: tuple[dict[str, Any], ...]
    user_id: str | None = None


@dataclass
class Problems:
    """Records skipped in lenient mode, each with the reason (file, record, field)."""
    messages: list[str] = field(default_factory=list)

    def add(self, msg: str) -> None:
        self.messages.append(msg)

    def __len__(self) -> int:
        return len(self.messages)


def _load_json(path: Path) -> Any:
    if not path.exists():
        raise LampFormatError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise LampFormatError(f"{path}: file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LampFormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _check_item(path: Path, qi: int, qid: str, ii: int, item: Any, fields: tuple[str, ...]) -> str | None:
    where = f"{path}: question #{qi} (id={qid!r}) profile item #{ii}"
    if not isinstance(item, dict):
        return f"{where}: expected an object, got {type(item).__name__}"
    if "id" not in item:
        return f"{where}: missing field 'id'"
    if not isinstance(item["id"], (str, int)):
        return f"{where}: field 'id' must be a string, got {type(item['id']).__name__}"
    for f in fields:
        if f not in item:
            return f"{where} (item id={item['id']!r}): missing field {f!r}"
        v = item[f]
        if f == "score":
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                return f"{where} (item id={item['id']!r}): field 'score' must be a number or string, got {type(v).__name__}"
        elif not isinstance(v, str):
            return f"{where} (item id={item['id']!r}): field {f!r} must be a string, got {type(v).__name__}"
    return None


def _check_question(path: Path, qi: int, rec: Any, fields: tuple[str, ...]) -> str | None:
    where = f"{path}: question #{qi}"
    if not isinstance(rec, dict):
        return f"{where}: expected an object, got {type(rec).__name__}"
    for f, typ in (("id", (str, int)), ("input", str), ("profile", list)):
        if f not in rec:
            return f"{where}{' (id=' + repr(rec.get('id')) + ')' if 'id' in rec else ''}: missing field {f!r}"
        if not isinstance(rec[f], typ) or isinstance(rec[f], bool):
            return f"{where} (id={rec.get('id')!r}): field {f!r} has type {type(rec[f]).__name__}"
    if "user_id" in rec and not isinstance(rec["user_id"], (str, int)):
        return f"{where} (id={rec['id']!r}): field 'user_id' has type {type(rec['user_id']).__name__}"
    seen: set[str] = set()
    for ii, item in enumerate(rec["profile"]):
        err = _check_item(path, qi, str(rec["id"]), ii, item, fields)
        if err:
            return err
        iid = str(item["id"])
        if iid in seen:
            return f"{path}: question #{qi} (id={rec['id']!r}) profile item #{ii}: duplicate item id {iid!r}"
        seen.add(iid)
    return None


def read_questions(path: str | os.PathLike, task: str | None = None, strict: bool = True
                   ) -> tuple[list[Question], Problems]:
    """Parse a questions file. `task` (canonical id) enables per-task profile field checks."""
    path = Path(path)
    fields = ITEM_FIELDS[canonical_task(task)] if task else ()
    data = _load_json(path)
    if not isinstance(data, list):
        raise LampFormatError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    if not data:
        raise LampFormatError(f"{path}: contains no questions")
    problems, out, ids = Problems(), [], set()
    for qi, rec in enumerate(data):
        err = _check_question(path, qi, rec, fields)
        if err is None and str(rec["id"]) in ids:
            err = f"{path}: question #{qi}: duplicate question id {str(rec['id'])!r}"
        if err:
            if strict:
                raise LampFormatError(err)
            problems.add(err)
            continue
        ids.add(str(rec["id"]))
        profile = tuple({**it, "id": str(it["id"])} for it in rec["profile"])
        uid = str(rec["user_id"]) if rec.get("user_id") is not None else None
        out.append(Question(id=str(rec["id"]), input=rec["input"], profile=profile, user_id=uid))
    if not out:
        raise LampFormatError(f"{path}: no valid question left ({len(problems)} skipped; first: {problems.messages[0]})")
    return out, problems


def read_outputs(path: str | os.PathLike, strict: bool = True) -> tuple[str | None, dict[str, str], Problems]:
    """Parse an outputs file (golds or predictions) -> (task id or None, {id: output}, problems)."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise LampFormatError(f"{path}: expected an object with 'task' and 'golds', got {type(data).__name__}")
    if "golds" not in data:
        raise LampFormatError(f"{path}: missing field 'golds'")
    if not isinstance(data["golds"], list):
        raise LampFormatError(f"{path}: field 'golds' must be a list, got {type(data['golds']).__name__}")
    task = data.get("task")
    if task is not None:
        if not isinstance(task, str):
            raise LampFormatError(f"{path}: field 'task' must be a string, got {type(task).__name__}")
        try:
            task = canonical_task(task)
        except ValueError as e:
            raise LampFormatError(f"{path}: field 'task': {e}") from None
    problems, out = Problems(), {}
    for i, rec in enumerate(data["golds"]):
        err = None
        if not isinstance(rec, dict):
            err = f"{path}: golds #{i}: expected an object, got {type(rec).__name__}"
        elif "id" not in rec:
            err = f"{path}: golds #{i}: missing field 'id'"
        elif "output" not in rec:
            err = f"{path}: golds #{i} (id={rec['id']!r}): missing field 'output'"
        elif not isinstance(rec["output"], (str, int, float)) or isinstance(rec["output"], bool):
            err = f"{path}: golds #{i} (id={rec['id']!r}): field 'output' has type {type(rec['output']).__name__}"
        elif str(rec["id"]) in out:
            err = f"{path}: golds #{i}: duplicate id {str(rec['id'])!r}"
        if err:
            if strict:
                raise LampFormatError(err)
            problems.add(err)
            continue
        out[str(rec["id"])] = str(rec["output"])
    return task, out, problems


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temp file + fsync + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(path: str | os.PathLike, task: str, outputs: dict[str, str]) -> None:
    """Write predictions or golds in the official outputs shape, ids in the given order."""
    write_json_atomic(path, {"task": canonical_task(task),
                             "golds": [{"id": k, "output": v} for k, v in outputs.items()]})


def write_questions(path: str | os.PathLike, questions: list[Question]) -> None:
    recs = []
    for q in questions:
        rec: dict[str, Any] = {"id": q.id, "input": q.input, "profile": list(q.profile)}
        if q.user_id is not None:
            rec["user_id"] = q.user_id
        recs.append(rec)
    write_json_atomic(path, recs)
