"""Many users' train/update jobs as one continuous session of the engine's batched Trainer.

A job joins a running session: its user gets a mini-batch in every step from the next free slot
on, so a one-item job finishes in a few steps however long the others' jobs are. A user leaves
when their module is done (the version is published and the job marked done at once) or when
cancelled (a deleted user: the module and the training data are dropped from memory at the next
step). Modules of one session share their stacked tensors, so a job whose module has other
shapes (another rank, other targets) waits for a later session.

    with TrainSession(personalizer, replay=0.5) as s:
        s.admit(job)               # False: other shapes (the job stays queued), or this user is in
        while s.busy:
            s.step()               # s.admit(...) / s.cancel(uid) between steps
    s.results                      # {job_id: TrainResult | the exception it failed with}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from oppu.store import Job, JobError


@dataclass(frozen=True)
class TrainResult:
    user_id: str
    version: int
    parent_version: int | None
    job_id: str
    losses: list[float]
    sources: tuple[str, ...]      # the examples' sources ("item:<id>"), in history order
    history_seq: int


@dataclass
class JobPlan:
    """One job's training data, decided before it joins a session."""
    job_id: str
    user_id: str
    kind: str
    examples: list
    history_seq: int
    meta: dict[str, Any]
    parent: int | None = None
    start: tuple | None = None
    order_seed: int | None = None


class Cancelled(Exception):
    """The job's user was deleted while it trained."""


def fail_job(store, job_id: str, e: BaseException) -> BaseException:
    """Mark the job failed with the error (a no-op when the job went with its user); returns e."""
    try:
        store.jobs.set(job_id, "failed", error=f"{type(e).__name__}: {e}")
    except JobError:
        pass
    return e


class TrainSession:
    def __init__(self, p, replay: float = 0.5, notes: dict[str, str] | None = None,
                 on_result: Callable[[str, Any], None] = lambda job_id, result: None,
                 pause: Callable[[], object] | None = None):
        """p: a Personalizer (with a store). notes: {job_id: version note}. on_result(job_id, result)
        runs as each job ends (done, failed or cancelled). pause() runs between the forward chunks
        of a step (the server yields to generation there)."""
        self.p, self.replay, self.notes, self.on_result = p, replay, dict(notes or {}), on_result
        self.pause = pause
        self.plans: dict[str, JobPlan] = {}          # user -> the plan training now
        self.results: dict[str, TrainResult | BaseException] = {}
        self._shapes: dict[str, tuple] | None = None
        self._ctx = self._trainer = None

    def __enter__(self) -> "TrainSession":
        from oppu.engine import Trainer

        p = self.p
        self._ctx = p.training_base()
        base = self._ctx.__enter__()
        try:
            self._trainer = Trainer(base, p.tok, {}, p.pcfg, p.ucfg, p.seed, p.max_len, p.max_users_per_batch,
                                    self._publish, p.tokens_per_forward, reserve=p.max_users_per_batch)
            self._trainer.pause = self.pause
        except BaseException:
            self._ctx.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._trainer.close()
        finally:
            self._ctx.__exit__(*exc)
        for pl in list(self.plans.values()):  # left unfinished (an error mid-step): failed, not lost
            self._end(pl, fail_job(self.p.store, pl.job_id, RuntimeError("the training session stopped")))

    @property
    def busy(self) -> bool:
        return self._trainer.busy

    def job_ids(self) -> list[str]:
        return [pl.job_id for pl in self.plans.values()]

    def admit(self, job: Job) -> bool:
        """Plan the job and let its user join. False when it cannot join this session (its user is
        already training here, or its module has other shapes): it stays queued. A job that cannot
        run at all is marked failed (True: handled)."""
        if job.user_id in self.plans:
            return False
        try:
            plan = self.p.plan_job(job, self.replay, self.pause)
            shapes = self._trainer.fresh_shapes() if plan.start is None else \
                {k: tuple(v.shape) for k, v in plan.start[1].items()}
            if self._shapes is not None and shapes != self._shapes:
                return False
            self.p.store.jobs.set(job.job_id, "running")
            self._trainer.add(job.user_id, plan.examples, plan.start, plan.order_seed)
            self._shapes = shapes
            self.plans[job.user_id] = plan
        except BaseException as e:
            self._set(job.job_id, fail_job(self.p.store, job.job_id, e))
            if not isinstance(e, Exception):
                raise
        return True

    def cancel(self, user_id: str, error: BaseException | None = None) -> str | None:
        """Drop the user's job from the session (module and data), failed with `error` (default:
        Cancelled, the user was deleted); the id of the job, or None when it holds none."""
        pl = self.plans.get(user_id)
        self._trainer.cancel(user_id)
        if pl is None:
            return None
        self._end(pl, fail_job(self.p.store, pl.job_id, error or Cancelled(f"user {user_id!r} was deleted")))
        return pl.job_id

    def step(self) -> None:
        self._trainer.step()

    def _publish(self, uid: str, losses: list[float], config, state) -> None:
        from oppu.engine import write_adapter

        pl, p = self.plans[uid], self.p
        try:
            v = p.store.put_version(
                uid, lambda d: (write_adapter(d, config, state), {"losses": losses})[1], task=p.task.id,
                peft_type=p.peft, parent_version=pl.parent, history_seq=pl.history_seq,
                note=self.notes.get(pl.job_id) or pl.meta["note"], meta={k: v for k, v in pl.meta.items() if k != "note"})
            p.store.jobs.set(pl.job_id, "done")
            result = TrainResult(v.user_id, v.version, v.parent_version, pl.job_id, v.meta.get("losses", []),
                                 tuple(v.meta.get("sources", [])), v.history_seq)
        except BaseException as e:  # e.g. the user was deleted meanwhile
            result = fail_job(p.store, pl.job_id, e)
        self._end(pl, result)

    def _end(self, pl: JobPlan, result) -> None:
        if self.plans.get(pl.user_id) is pl:
            del self.plans[pl.user_id]
        self._set(pl.job_id, result)

    def _set(self, job_id: str, result) -> None:
        self.results[job_id] = result
        self.on_result(job_id, result)
