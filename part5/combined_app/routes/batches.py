"""Batch jobs over HTTP: submit a list of prompts, poll the job, fetch the results::

    POST   /api/batches               {"prompts": ["...", {"id": 7, "prompt": "..."}], "max_tokens": 64}
    GET    /api/batches               every job of this server run
    GET    /api/batches/{id}          status: queued, running, completed, cancelled or failed
    GET    /api/batches/{id}/results  one record per finished prompt (as part3/batch_process.py writes)
    DELETE /api/batches/{id}          cancel a job that is still running

A job runs in a background thread through ``llmlab.batch.run_with_engine`` on the shared
engine, leaving one slot free for interactive requests when there are several. Its input
and output are JSON lines under ``$LLMLAB_HOME/server-batches/<id>/``; each finished row is
written at once, so results can be fetched while the job runs.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llmlab import batch
from llmlab.backends.base import GenerationParams
from llmlab.engine import QueueFullError
from part5.combined_app.errors import APIError
from part5.combined_app.schemas import BatchRequest

router = APIRouter(prefix="/api/batches", tags=["batch"])


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

    @property
    def input_path(self) -> Path:
        return self.folder / "input.jsonl"

    @property
    def output_path(self) -> Path:
        return self.folder / "output.jsonl"

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


def run_job(job: BatchJob, engine: Any, retry_after: float) -> None:
    """Run every row of ``job`` (in a thread). A full queue pauses the job; it never fails it."""
    job.status = "running"
    rows = list(batch.read_inputs(job.input_path))
    slots = max(1, engine.parallel - 1)
    try:
        while not job.cancel.is_set():
            done = batch.completed_ids(job.output_path)
            todo = [r for r in rows if batch.id_key(r.id) not in done]
            if not todo:
                break
            outcomes = batch.run_with_engine(
                engine, todo, job.params, system=job.system, max_in_flight=slots
            )
            try:
                with batch.OutputWriter(job.output_path) as out:
                    for outcome in outcomes:
                        out.write(outcome)
                        job.completed += 1
                        job.failed += outcome.error is not None
                        if job.cancel.is_set():
                            break
            except QueueFullError:
                job.cancel.wait(retry_after)  # interactive traffic has the queue: wait, resume
            finally:
                outcomes.close()  # cancels rows still in flight
        job.status = "cancelled" if job.cancel.is_set() else "completed"
    except Exception as exc:  # reported by the status route
        job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        job.finished = time.time()


def _jobs(request: Request) -> dict[str, BatchJob]:
    return request.app.state.batch_jobs


def _job(request: Request, job_id: str) -> BatchJob:
    job = _jobs(request).get(job_id)
    if job is None:
        raise APIError(
            404,
            f"There is no batch {job_id!r} on this server (jobs last for one "
            "server run). GET /api/batches lists them.",
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


@router.post("", status_code=202)
async def submit(body: BatchRequest, request: Request) -> JSONResponse:
    """Start a job; answers 202 at once with the job's id and status."""
    service = request.app.state.service
    settings = request.app.state.settings
    engine = service.require_ready()
    if len(body.prompts) > settings.max_batch_prompts:
        raise APIError(
            400,
            f"{len(body.prompts)} prompts is over this server's limit of "
            f"{settings.max_batch_prompts} per batch; split the job.",
            param="prompts",
        )
    max_tokens = body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens is {max_tokens}, over this server's limit of {settings.max_tokens_limit}.",
            param="max_tokens",
        )
    try:
        records = _records(body)
    except ValueError as exc:
        raise APIError(400, f"Unsupported message content: {exc}.", param="prompts") from exc
    params = GenerationParams.from_kwargs(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop or [],
    )
    job_id = f"batch_{uuid.uuid4().hex[:16]}"
    job = BatchJob(job_id, settings.batches_dir / job_id, len(records), params, body.system)
    job.folder.mkdir(parents=True, exist_ok=True)
    job.input_path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    _jobs(request)[job_id] = job
    threading.Thread(
        target=run_job,
        args=(job, engine, settings.retry_after),
        name=f"llmlab-{job_id}",
        daemon=True,
    ).start()
    return JSONResponse(job.to_dict(), 202)


@router.get("")
async def list_jobs(request: Request) -> dict[str, Any]:
    """Every job of this server run, newest first."""
    jobs = sorted(_jobs(request).values(), key=lambda j: j.created, reverse=True)
    return {"object": "list", "data": [j.to_dict() for j in jobs]}


@router.get("/{job_id}")
async def status(job_id: str, request: Request) -> dict[str, Any]:
    """Progress of one job."""
    return _job(request, job_id).to_dict()


@router.get("/{job_id}/results")
async def results(job_id: str, request: Request) -> dict[str, Any]:
    """The records of the finished prompts so far, in input order."""
    job = _job(request, job_id)
    order = {
        batch.id_key(json.loads(line)["id"]): n
        for n, line in enumerate(job.input_path.read_text(encoding="utf-8").splitlines())
    }
    records = []
    if job.output_path.exists():
        for line in job.output_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a blank line, or the last one while it is being written
    records.sort(key=lambda r: order.get(batch.id_key(r.get("id")), len(order)))
    return {"id": job.id, "status": job.status, "results": records}


@router.delete("/{job_id}")
async def cancel(job_id: str, request: Request) -> dict[str, Any]:
    """Cancel a running job; the rows finished so far stay in its results."""
    job = _job(request, job_id)
    if job.status in ("queued", "running"):
        job.cancel.set()
    return job.to_dict()
