"""Batch jobs over HTTP: submit a list of prompts, poll the job, fetch the results::

    POST   /api/batches               {"prompts": ["...", {"id": 7, "prompt": "..."}], "max_tokens": 64}
    GET    /api/batches               every job, newest first
    GET    /api/batches/{id}          status: queued, running, completed, cancelled, interrupted or failed
    GET    /api/batches/{id}/results  one record per finished prompt (as part3/batch_process.py writes)
    DELETE /api/batches/{id}          cancel a job that is still running

A job runs in a background thread through ``llmlab.batch.run_with_engine`` on the shared
engine, leaving one slot free for interactive requests when there are several. Everything
about it lives under ``$LLMLAB_HOME/server-batches/<id>/``: ``input.jsonl``, ``output.jsonl``
(each finished row written at once, so results can be fetched while the job runs) and
``job.json`` (parameters and status). A job that a stopped server left unfinished is
``interrupted``; the next server run lists it again and resumes it from the rows not yet
written, so no finished row is lost or run twice (a damaged output line is logged and moved
to ``output.jsonl.damaged``, and only its row runs again). A job running when the engine
fails goes on the same way on the new engine the server loads (if none loads, it is
``interrupted`` and resumes on the next run). A job that cannot be created
(text that is not valid Unicode, a full disk) leaves no folder behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llmlab import batch
from llmlab.backends.base import GenerationParams
from llmlab.engine import Engine, EngineError, QueueFullError
from part5.combined_app.errors import APIError, responses
from part5.combined_app.generation import sampling_params
from part5.combined_app.schemas import BatchRequest, TextRoute

if TYPE_CHECKING:
    from part5.combined_app.service import ModelService

router = APIRouter(prefix="/api/batches", tags=["batch"], route_class=TextRoute)
log = logging.getLogger("llmlab.server")


@dataclass
class BatchJob:
    """One submitted job and its progress."""

    id: str
    folder: Path
    total: int
    params: GenerationParams
    system: str | None = None
    status: str = "queued"
    completed: int = 0
    failed: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    stopping: bool = False  # the server is shutting down: end as "interrupted", resume later
    thread: threading.Thread | None = None

    @property
    def input_path(self) -> Path:
        return self.folder / "input.jsonl"

    @property
    def output_path(self) -> Path:
        return self.folder / "output.jsonl"

    @property
    def state_path(self) -> Path:
        return self.folder / "job.json"

    def save(self) -> None:
        """Write parameters and status to ``job.json`` (replaced whole, never half-written)."""
        state = {**self.to_dict(), "params": asdict(self.params), "system": self.system}
        partial = self.state_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
        partial.replace(self.state_path)

    def recount(self) -> batch.Finished:
        """Count progress from the output file, setting aside (and logging) damaged lines."""
        found = batch.read_finished(self.output_path)
        for line, why in found.damaged:
            log.warning(
                "Batch job %s: line %d of its output was damaged (%s); moved to %s, "
                "its row runs again",
                self.id,
                line,
                why,
                found.aside,
            )
        self.completed, self.failed = len(found.records), found.failed
        return found

    @classmethod
    def load(cls, folder: Path) -> BatchJob:
        """The job saved in ``folder``; progress is counted from its output file.

        A job that was queued or running when its server stopped comes back ``interrupted``.
        """
        state = json.loads((folder / "job.json").read_text(encoding="utf-8"))
        job = cls(
            id=state["id"],
            folder=folder,
            total=state["total"],
            params=GenerationParams(**state["params"]),
            system=state.get("system"),
            status=state["status"],
            error=state.get("error"),
            created=state["created"],
            finished=state.get("finished"),
        )
        if job.status in ("queued", "running"):
            job.status = "interrupted"
        job.recount()
        return job

    def to_dict(self) -> dict[str, Any]:
        """The job as the status route returns it."""
        return {
            "id": self.id,
            "object": "batch",
            "status": self.status,
            "total": self.total,
            "completed": self.completed,
            "failed": self.failed,
            "error": self.error,
            "created": int(self.created),
            "finished": int(self.finished) if self.finished else None,
        }


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The records written to an output file so far (a half-written last line is skipped)."""
    records = []
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a blank line, or the last one while it is being written
            if isinstance(record, dict):
                records.append(record)
    return records


def load_jobs(folder: Path) -> dict[str, BatchJob]:
    """The jobs earlier server runs saved under ``folder`` (unreadable ones are logged and skipped)."""
    jobs = {}
    for state in sorted(folder.glob("*/job.json")):
        try:
            job = BatchJob.load(state.parent)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Skipping the batch job in %s: %s", state.parent, exc)
            continue
        jobs[job.id] = job
    return jobs


def start_job(job: BatchJob, service: ModelService, retry_after: float) -> None:
    """Run ``job`` in a background thread, on the service's engine (and on the next one if
    that one fails)."""
    job.thread = threading.Thread(
        target=run_job,
        args=(job, service, retry_after),
        name=f"llmlab-{job.id}",
        daemon=True,
    )
    job.thread.start()


def run_job(job: BatchJob, service: ModelService, retry_after: float) -> None:
    """Run every row of ``job`` not yet in its output (in a thread). A full queue pauses the
    job; it never fails it. A row cut short by a shutdown or an engine failure is not
    written: after a failure the job goes on on the new engine with the rows not yet
    written; if no new engine loads, the job is ``interrupted`` and resumes next server run."""
    job.status, job.error = "running", None
    job.save()
    rows = list(batch.read_inputs(job.input_path))
    engine = service.wait_for_engine(job.cancel)
    try:
        while engine is not None and not job.cancel.is_set():
            done = job.recount().ids
            todo = [r for r in rows if batch.id_key(r.id) not in done]
            if not todo:
                break
            if not _run_rows(job, engine, todo, retry_after):
                log.warning(
                    "Batch job %s: the model failed after %d of %d rows; the rest run on "
                    "the new engine once it is loaded",
                    job.id,
                    job.completed,
                    job.total,
                )
                engine = service.wait_for_engine(job.cancel, failed=engine)
        if job.stopping:
            job.status = "interrupted"
        elif job.cancel.is_set():
            job.status = "cancelled"
        elif engine is None:
            job.status = "interrupted"
            job.error = (
                f"{service.error} The finished rows are kept; the job resumes when the "
                "server starts again."
            )
        else:
            job.status = "completed"
    except Exception as exc:  # reported by the status route
        job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        if job.status != "interrupted":
            job.finished = time.time()
        job.save()


def _run_rows(
    job: BatchJob, engine: Engine, todo: list[batch.InputRow], retry_after: float
) -> bool:
    """Run ``todo`` on ``engine``, writing each finished row at once; ``False`` if the engine
    failed (the rows it cut short are not written, so they run again)."""
    outcomes = batch.run_with_engine(
        engine, todo, job.params, system=job.system, max_in_flight=max(1, engine.parallel - 1)
    )
    try:
        with batch.OutputWriter(job.output_path) as out:
            for outcome in outcomes:
                if outcome.result is None and engine.failure is not None:
                    return False  # this row's error is the engine's, not the row's
                if outcome.result and outcome.result.finish_reason == "interrupted":
                    break  # the engine is closing: this row is not done
                out.write(outcome)
                job.completed += 1
                job.failed += outcome.error is not None
                if job.cancel.is_set():
                    break
    except QueueFullError:
        job.cancel.wait(retry_after)  # interactive traffic has the queue: wait, resume
    except EngineError:  # refused: the engine failed (or is closing for a shutdown)
        if engine.failure is None and not job.stopping:
            raise
        return False
    finally:
        outcomes.close()  # cancels rows still in flight
    return True


def resume_jobs(jobs: dict[str, BatchJob], service: ModelService, retry_after: float) -> None:
    """Start again every job an earlier server run left ``interrupted``."""
    for job in jobs.values():
        if job.status == "interrupted" and not job.stopping:
            log.info("Resuming batch job %s (%d of %d rows done)", job.id, job.completed, job.total)
            start_job(job, service, retry_after)


def stop_jobs(jobs: dict[str, BatchJob]) -> None:
    """Ask running jobs to stop because the server is shutting down (they resume next run)."""
    for job in jobs.values():
        job.stopping = True  # also keeps a job that was about to resume from starting
        if job.status in ("queued", "running"):
            job.cancel.set()


def join_jobs(jobs: dict[str, BatchJob], timeout: float = 10.0) -> None:
    """Wait for stopped jobs to write their last row and status (after the engine closed)."""
    deadline = time.monotonic() + timeout
    for job in jobs.values():
        if job.thread is not None:
            job.thread.join(max(0.0, deadline - time.monotonic()))


def _jobs(request: Request) -> dict[str, BatchJob]:
    return request.app.state.batch_jobs


def _job(request: Request, job_id: str) -> BatchJob:
    job = _jobs(request).get(job_id)
    if job is None:
        raise APIError(
            404,
            f"There is no batch {job_id!r} on this server. GET /api/batches lists them.",
            param="batch_id",
            code="batch_not_found",
        )
    return job


def _records(body: BatchRequest) -> list[dict[str, Any]]:
    records = []
    for number, item in enumerate(body.prompts, start=1):
        if isinstance(item, str):
            records.append({"id": number, "prompt": item})
            continue
        record: dict[str, Any] = {"id": item.id if item.id is not None else number}
        if item.messages is not None:
            record["messages"] = [{"role": m.role, "content": m.text()} for m in item.messages]
        elif item.prompt is not None:
            record["prompt"] = item.prompt
        else:
            raise APIError(
                400,
                f"prompts[{number - 1}] has neither 'prompt' nor 'messages'.",
                param=f"prompts.{number - 1}",
            )
        records.append(record)
    ids = [json.dumps(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        raise APIError(400, "Two prompts have the same id; ids must be unique.", param="prompts")
    return records


@router.post("", status_code=202, responses=responses(400, 500, 503))
async def submit(body: BatchRequest, request: Request) -> JSONResponse:
    """Start a job; answers 202 at once with the job's id and status."""
    service = request.app.state.service
    settings = request.app.state.settings
    service.require_ready()
    if len(body.prompts) > settings.max_batch_prompts:
        raise APIError(
            400,
            f"{len(body.prompts)} prompts is over this server's limit of "
            f"{settings.max_batch_prompts} per batch; split the job.",
            param="prompts",
        )
    params = sampling_params(body, settings)
    try:
        records = _records(body)
    except ValueError as exc:
        raise APIError(400, f"Unsupported message content: {exc}.", param="prompts") from exc
    # Everything is checked before the job's folder exists, so a refused job leaves nothing.
    rows = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    for param, text in (("prompts", rows), ("system", body.system), ("stop", params.stop)):
        _check_unicode(param, text)
    job_id = f"batch_{uuid.uuid4().hex[:16]}"
    job = BatchJob(job_id, settings.batches_dir / job_id, len(records), params, body.system)
    _create(job, rows.encode("utf-8"))
    _jobs(request)[job_id] = job
    start_job(job, service, settings.retry_after)
    return JSONResponse(job.to_dict(), 202)


def _check_unicode(param: str, text: str | list[str] | None) -> None:
    """Refuse text that cannot be stored as UTF-8: a lone surrogate, half of an emoji."""
    for item in [text] if isinstance(text, str) else text or []:
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(
                400,
                f"'{param}' holds text that is not valid Unicode: a lone surrogate such as "
                "\\ud83d (half of an emoji written as a JSON escape). Send each character whole.",
                param=param,
            ) from exc


def _create(job: BatchJob, rows: bytes) -> None:
    """Write a new job's folder: its input and ``job.json``, or nothing if that fails."""
    try:
        job.folder.mkdir(parents=True)  # a new id: an existing folder is never reused
    except OSError as exc:
        raise _not_stored(exc) from exc
    try:
        job.input_path.write_bytes(rows)
        job.save()
    except BaseException as exc:
        shutil.rmtree(job.folder, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _not_stored(exc) from exc
        raise


def _not_stored(exc: OSError) -> APIError:
    log.error("Could not store a batch job: %s", exc)
    return APIError(
        500,
        f"The server could not store the batch job ({exc.strerror or exc}); nothing was kept. "
        "Retry later, or ask its operator to free disk space.",
        code="batch_not_stored",
    )


@router.get("")
async def list_jobs(request: Request) -> dict[str, Any]:
    """Every job (this server run's and unfinished or finished ones of earlier runs), newest first."""
    jobs = sorted(_jobs(request).values(), key=lambda j: j.created, reverse=True)
    return {"object": "list", "data": [j.to_dict() for j in jobs]}


@router.get("/{job_id}", responses=responses(404))
async def status(job_id: str, request: Request) -> dict[str, Any]:
    """Progress of one job."""
    return _job(request, job_id).to_dict()


@router.get("/{job_id}/results", responses=responses(404))
async def results(job_id: str, request: Request) -> dict[str, Any]:
    """The records of the finished prompts so far, in input order."""
    job = _job(request, job_id)
    order = {
        batch.id_key(json.loads(line)["id"]): n
        for n, line in enumerate(job.input_path.read_text(encoding="utf-8").splitlines())
    }
    records = _read_records(job.output_path)
    records.sort(key=lambda r: order.get(batch.id_key(r.get("id")), len(order)))
    return {"id": job.id, "status": job.status, "results": records}


@router.delete("/{job_id}", responses=responses(404))
async def cancel(job_id: str, request: Request) -> dict[str, Any]:
    """Cancel a running job; the rows finished so far stay in its results."""
    job = _job(request, job_id)
    if job.status in ("queued", "running"):
        job.cancel.set()
    elif job.status == "interrupted":  # not running: nothing to wait for
        job.status, job.finished = "cancelled", time.time()
        job.save()
    return job.to_dict()
