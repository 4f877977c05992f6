"""Request and response bodies of the HTTP API, with their limits (pydantic; the OpenAPI spec is
generated from these). History items are checked field by field against the task afterwards
(oppu.lifecycle.validate_items), so errors name the item and the field.

Limits: a request body of at most ServeConfig.max_body_bytes (1 MiB; an import
ServeConfig.max_import_bytes), MAX_ITEMS history items per request, MAX_INPUT_CHARS characters of
generate input, k <= MAX_K retrieved items. Every string must be encodable as UTF-8 (JSON can
carry lone surrogates; SQLite and the tokenizer cannot store or read them). Numbers and booleans
are strict: `true` is not 1, "2" is not 2. A passphrase travels in the JSON body exactly as typed
(never trimmed; the key derivation NFC-normalizes it, so composed and decomposed accents agree).
"""
import base64
import binascii
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from oppu.store import USER_ID_PATTERN

MAX_ITEMS = 1000
MAX_INPUT_CHARS = 8192
MAX_K = 16
MAX_TASK_CHARS = 64
MIN_PASSPHRASE, MAX_PASSPHRASE = 8, 1024
JOB_STATUSES = ("queued", "running", "done", "failed")


def _utf8(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: text must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _utf8(k, where)
            _utf8(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _utf8(v, f"{where}[{i}]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _encodable(self):
        for name in type(self).model_fields:
            _utf8(getattr(self, name), name)
        return self


class HistoryIn(_Strict):
    task: str = Field(min_length=1, max_length=MAX_TASK_CHARS, description="the task the server serves",
                      examples=["LaMP_2M"])
    items: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ITEMS,
                                        description="history items, each with a unique 'id' and the task's "
                                                    "item fields (LaMP_2M: description, tag)")


class GenerateIn(_Strict):
    task: str = Field(min_length=1, max_length=MAX_TASK_CHARS, examples=["LaMP_2M"])
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS, description="a LaMP-style query input")
    k: int | None = Field(default=None, ge=0, le=MAX_K, strict=True,
                          description="history items retrieved into the prompt (default: the server's --k)")


Passphrase = Field(min_length=MIN_PASSPHRASE, max_length=MAX_PASSPHRASE,
                   description="encrypts/decrypts the export (scrypt + AES-256-GCM); UTF-8 exactly as typed")


class ExportIn(_Strict):
    passphrase: str = Passphrase
    history: bool = Field(default=True, strict=True, description="include the history items")


class ImportIn(_Strict):
    export: str = Field(min_length=1, description="the encrypted export file, base64-encoded")
    passphrase: str = Passphrase
    user_id: str | None = Field(default=None, pattern=USER_ID_PATTERN,
                                description="the new user's id (default: the id in the export)")

    @field_validator("export")
    @classmethod
    def _base64(cls, v: str) -> str:
        try:
            base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be the export file in standard base64") from None
        return v

    def blob(self) -> bytes:
        return base64.b64decode(self.export, validate=True)


class RollbackIn(_Strict):
    version: int = Field(ge=1, le=2**31 - 1, strict=True, description="an existing, intact version of the user")


class UserCreated(BaseModel):
    user_id: str = Field(pattern=USER_ID_PATTERN)
    token: str = Field(description="the user's bearer token; shown once, stored only as a hash")


class UserOut(BaseModel):
    user_id: str
    task: str | None
    active_version: int | None
    versions: list[int]
    history_items: int


class Imported(BaseModel):
    user_id: str
    token: str = Field(description="the new user's bearer token; shown once")
    active_version: int
    history_items: int


class TokenOut(BaseModel):
    user_id: str
    token: str = Field(description="the new bearer token; shown once; the user's older tokens stop working")
    revoked: int = Field(description="how many older tokens were revoked")


class VersionOut(BaseModel):
    version: int
    created: float
    parent_version: int | None
    note: str
    history_seq: int
    peft_type: str
    active: bool
    intact: bool = Field(description="its files match the checksums recorded when it was written")
    problem: str | None = Field(description="why it is not intact")


class VersionsOut(BaseModel):
    user_id: str
    active_version: int | None
    versions: list[VersionOut]


class HistoryAdded(BaseModel):
    user_id: str
    added: int
    last_seq: int
    instant_version: int | None = Field(default=None, description="the instant adapter version made for this "
                                        "history (active at once) when the server has an instant bank and the "
                                        "user no trained version; else null")


class JobOut(BaseModel):
    job_id: str
    user_id: str
    kind: str = Field(description="train (first adapter) or update (incremental)")
    status: str = Field(description="queued | running | done | failed")
    version: int | None = Field(description="the adapter version the job published (when done)")
    error: str | None
    created: float
    updated: float


class Generated(BaseModel):
    output: str = Field(description="generated text")
    prediction: str = Field(description="the task's parse of the output (e.g. the tag)")
    adapter_version: int = Field(description="the adapter version that answered")


class Deleted(BaseModel):
    user_id: str
    deleted: bool = Field(description="true: every row, file and cache of the user is gone, for every request")
    scrubbed: bool = Field(description="the WAL holds no old image of the deleted rows any more; false: a reader "
                                       "is in the way, the server retries in the background (GET /scrub)")
    scrub: int = Field(description="this delete's scrub generation: scrubbed once GET /scrub says done >= it")


class ScrubStatus(BaseModel):
    requested: int = Field(description="the latest scrub generation asked for (one per delete)")
    done: int = Field(description="every generation up to this one is scrubbed")


class Health(BaseModel):
    status: str
    task: str
    base: str
    trainer_base: str
    uptime_s: float


class Problem(BaseModel):
    detail: str
