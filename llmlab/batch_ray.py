"""Batch jobs on a Ray cluster: rows go to Ray actors that each hold one lab engine.

Behind ``python part3/batch_process.py INPUT -o OUTPUT --ray [ADDRESS]``::

    from llmlab import batch, batch_ray
    runner = batch_ray.RayRunner(parallel=8)          # no address: a local Ray for this run
    with runner, batch.OutputWriter("answers.jsonl") as out:
        for outcome in runner.run(rows, params):        # outcomes as they arrive
            out.write(outcome)

Each actor (:class:`RowWorker`) loads one :class:`llmlab.engine.Engine` and runs the rows it
is given through :func:`llmlab.batch.run_with_engine`, the same code as a local run, so
greedy outputs are the same. It sends each outcome back as soon as its row finishes (a
Ray streaming generator); the driver writes it at once, so ``--resume`` means what it
means locally: one line per input, none lost, none doubled.

A worker that dies mid-job (its process killed, its machine gone) or whose engine fails:
its rows that had not come back are retried once, each on its own so that a row that
kills its worker cannot take others with it; a row whose retry fails too is written as
an error row, as a local run writes a row it could not run. A new actor takes the dead
one's place.

Ray is imported only here, so a local run never imports it. A local Ray listens on the
loopback interface only and starts no dashboard. Every node of a real cluster needs the
lab installed (``pip install -r requirements.txt`` and ``pip install -e .``) and the
model: each actor resolves the model name itself, with the driver's ``LLMLAB_*`` settings.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmlab import batch, registry
from llmlab.backends.base import BackendError, GenerationParams
from llmlab.settings import get_settings

RETRIES = 1  # a row whose worker died is run once more, then written as an error row
# Ray takes the address of this machine's network interface unless told it runs one node
# (the switch Ray itself sets on macOS and Windows); then it stays on 127.0.0.1.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayError(BackendError):
    """Ray could not be started or reached, or no engine could be loaded on it."""


class RowWorker:
    """A Ray actor's state: one engine, and the rows it is given run through it."""

    def __init__(self, model: str | None, parallel: int, n_ctx: int | None, threads: int):
        self.options = {"model": model, "parallel": parallel, "n_ctx": n_ctx, "threads": threads}
        self.engine = None
        self.problem: BaseException | None = None

    def load(self) -> str:
        """Load the model (checked as a local run checks it); returns where it runs.

        Raises the loading error (an unknown model, a damaged file) for the driver to show.
        """
        from llmlab.engine import Engine

        options = dict(self.options)
        try:
            spec = registry.resolve(options.pop("model"))
            if spec.format == "gguf" and spec.path.is_file():
                registry.read_gguf_info(spec.path)  # junk under a model's name: say so
            self.engine = Engine(spec, deterministic=True, **options)  # as a local run
        except BaseException as exc:
            self.problem = exc
            raise
        return f"pid {os.getpid()}"

    def run(
        self,
        rows: list[batch.InputRow],
        params: GenerationParams,
        system: str | None,
        template: str | None,
    ) -> Iterator[batch.Outcome]:
        """Run ``rows`` through the engine, yielding each outcome as its row finishes."""
        if self.engine is None:
            raise RayError(f"this worker has no engine ({self.problem or 'not loaded'})")
        yield from batch.run_with_engine(self.engine, rows, params, system, template)


@dataclass
class _Task:
    """One call to an actor: the rows it was given, and the ids that came back."""

    actor: Any
    rows: list[batch.InputRow]
    returned: set[str] = field(default_factory=set)


def _lab_environment() -> dict[str, str]:
    """The driver's ``LLMLAB_*`` variables, so workers resolve models as the driver would."""
    return {key: value for key, value in os.environ.items() if key.startswith("LLMLAB_")}


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to the Ray cluster at ``address``, or start a local one; ``True`` if this started it.

    A driver already connected (``ray.init`` called before) is used as it is. A local Ray
    gets ``num_cpus`` (default: every core of this machine), listens on 127.0.0.1 only and
    has no dashboard.

    Raises:
        RayError: Ray could not start, or nothing answers at ``address``.
    """
    if address is None:
        os.environ.setdefault(LOOPBACK_ENV, "0")  # read when ray is first imported
    import ray

    if ray.is_initialized():
        return False
    try:
        if address is None:
            _start_local(num_cpus or os.cpu_count() or 1)
        else:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    except Exception as exc:  # Ray raises plain Exception/ConnectionError for both cases
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        hint = (
            "Check the address (`ray status` on the head node prints it; `auto` finds a "
            "cluster started on this machine with `ray start --head`)."
            if address
            else "On a busy machine Ray's helper processes can miss their start-up window: "
            "try again, or start Ray yourself with `ray start --head` and pass --ray auto."
        )
        raise RayError(f"could not start or reach {where} ({exc}). {hint}") from None
    if address is None and ray.util.get_node_ip_address() != "127.0.0.1":
        ray.shutdown()  # ray was imported before LOOPBACK_ENV was set: it took the network's
        raise RayError(
            f"a local Ray would listen on {ray.util.get_node_ip_address()}, not 127.0.0.1: set "
            f"{LOOPBACK_ENV}=0 before ray is first imported, or pass the address of a cluster."
        )
    return True


def _start_local(num_cpus: int) -> None:
    """``ray.init`` for a one-machine Ray, tried twice.

    The raylet gives the dashboard agent a fixed 15 s to report its ports and aborts if it
    misses them, which happens on a machine whose cores are all busy; a second start
    usually makes it (the agent's imports are then in the page cache).
    """
    import ray

    for attempt in range(2):
        try:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                logging_level="WARNING",
            )
            return
        except Exception:
            ray.shutdown()
            if attempt:
                raise


class RayRunner:
    """Engines on Ray actors, and the scheduling of a job's rows onto them.

    Args:
        address: a Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``); ``None``
            starts a local Ray for this runner and stops it in :meth:`close`.
        model, parallel, n_ctx: as for :class:`llmlab.engine.Engine`, on every actor.
        actors: how many engines (default: as many as the cluster's CPUs hold).
        actor_cpus: CPUs each actor reserves, and its engine's threads (default:
            ``LLMLAB_THREADS``, at most the cluster's CPUs).
        chunk: rows sent to an actor in one call (default: four times ``parallel``).
        worker: the actor class (a subclass of :class:`RowWorker`, e.g. in a test).

    Raises:
        RayError: Ray could not be reached, or an actor could not load the model (the
            loading error itself, e.g. a :class:`~llmlab.registry.RegistryError`, is
            raised when it is one the lab knows).
    """

    def __init__(
        self,
        address: str | None = None,
        model: str | None = None,
        parallel: int = 4,
        n_ctx: int | None = None,
        actors: int | None = None,
        actor_cpus: int | None = None,
        chunk: int | None = None,
        worker: type[RowWorker] = RowWorker,
    ):
        self.started = connect(address)  # first: it decides how ray is imported
        import ray

        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.actor_cpus = actor_cpus or min(get_settings().threads, cpus)
        self.count = actors or max(1, cpus // self.actor_cpus)
        self.chunk = chunk or 4 * parallel
        self._actor_class = ray.remote(worker).options(
            num_cpus=self.actor_cpus, runtime_env={"env_vars": _lab_environment()}
        )
        self._engine_options = (model, parallel, n_ctx, self.actor_cpus)
        self.actors: list[Any] = []
        try:
            self.actors = [self._new_actor() for _ in range(self.count)]
            ray.get([actor.load.remote() for actor in self.actors])
        except ray.exceptions.RayTaskError as exc:
            self.close()
            cause = exc.cause
            if isinstance(cause, registry.RegistryError | BackendError):
                raise cause from None
            raise RayError(f"a Ray worker could not load the model: {cause!r}") from None
        except ray.exceptions.RayError as exc:  # e.g. the worker ran out of memory
            self.close()
            raise RayError(f"a Ray worker died while loading the model ({exc})") from None
        except BaseException:
            self.close()
            raise

    def _new_actor(self) -> Any:
        return self._actor_class.remote(*self._engine_options)

    def _replace(self, actor: Any) -> Any:
        """Kill ``actor`` (dead, or alive with a failed engine) and start one in its place."""
        import ray

        ray.kill(actor, no_restart=True)
        new = self._new_actor()
        new.load.remote()  # runs before any row call: an actor runs its calls in order
        self.actors[self.actors.index(actor)] = new
        return new

    def run(
        self,
        rows: Iterable[batch.InputRow],
        params: GenerationParams,
        system: str | None = None,
        template: str | None = None,
    ) -> Iterator[batch.Outcome]:
        """Yield one :class:`~llmlab.batch.Outcome` per row, in the order they finish.

        Rows go out in chunks, one call per actor at a time. If an actor dies (or its call
        fails), the rows of that call that had not come back are queued again one by one,
        once; a row that fails a second time is yielded as an error outcome.
        """
        import ray

        todo = collections.deque(_chunks(list(rows), self.chunk))
        tries: collections.Counter[str] = collections.Counter()
        idle = list(self.actors)
        running: dict[Any, _Task] = {}
        try:
            while todo or running:
                while idle and todo:
                    task = _Task(idle.pop(), todo.popleft())
                    call = task.actor.run.remote(task.rows, params, system, template)
                    running[call] = task
                [call], _ = ray.wait(list(running), num_returns=1)
                task = running[call]
                try:
                    outcome = ray.get(next(call))
                except StopIteration:  # the call has sent all its rows
                    del running[call]
                    idle.append(task.actor)
                    continue
                except ray.exceptions.RayError as exc:  # the actor died, or its call failed
                    del running[call]
                    idle.append(self._replace(task.actor))
                    for row in task.rows:
                        key = batch.id_key(row.id)
                        if key in task.returned:
                            continue
                        tries[key] += 1
                        if tries[key] > RETRIES:
                            yield batch.Outcome(row, error=_failure(exc, tries[key]))
                        else:
                            todo.append([row])
                    continue
                task.returned.add(batch.id_key(outcome.row.id))
                yield outcome
        finally:
            for call in running:
                ray.cancel(call)

    def close(self) -> None:
        """Stop the actors; shut down the local Ray if this runner started it."""
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(rows: list[batch.InputRow], size: int) -> Iterator[list[batch.InputRow]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _failure(exc: BaseException, tries: int) -> str:
    """The error written for a row whose Ray worker failed ``tries`` times."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        why = f"its engine failed: {exc.cause!r}"
    else:
        why = "the worker process died"
    return (
        f"RayWorkerError: the Ray worker running this row failed {tries} times ({why}). "
        "The workers' logs say more (`ray logs cluster` on the head node)."
    )
