"""serve run part5.combined_app.ray_serve:app [num_replicas=2] [threads=1] [parallel=4] ...

The lab server as a Ray Serve deployment: each replica builds the same FastAPI app
(``create_app``) and holds its own engine, and Ray Serve's proxy (port 8000) spreads
requests over the replicas, so ``/v1``, the page and every other route answer as they do
from ``scripts/server.py``. Run it from the repository root (so ``part5`` is importable).

``app`` is a Ray Serve application builder: the ``key=value`` arguments after it are
:class:`RayServeOptions`, i.e. every :class:`ServerSettings` field (also read from
``LLMLAB_SERVER_<FIELD>``) plus ``num_replicas`` and ``replica_cpus``. ``host`` and
``port`` do not apply here: Ray Serve's proxy listens where ``serve run`` / ``serve start``
says (127.0.0.1:8000 by default). From Python::

    from ray import serve
    from part5.combined_app.ray_serve import app
    serve.run(app({"num_replicas": 2, "threads": 1}))

A replica whose engine failed and could not be reloaded reports itself unhealthy, and
Ray Serve replaces it with a fresh one.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from ray import serve
from ray.serve import Application

from part5.combined_app.app import create_app
from part5.combined_app.config import ServerSettings


class RayServeOptions(ServerSettings):
    """The server's settings plus the Ray Serve ones (also ``LLMLAB_SERVER_NUM_REPLICAS``, ...)."""

    num_replicas: int = Field(1, ge=1, description="Copies of the app, each with its own engine.")
    replica_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs Ray reserves for each replica (default: threads, else 1).",
    )

    def server_settings(self) -> ServerSettings:
        """The settings each replica's app is built with."""
        return ServerSettings(**self.model_dump(exclude={"num_replicas", "replica_cpus"}))


@serve.deployment(name="llmlab")
@serve.ingress()
class LabServer:
    """One replica: the lab's FastAPI app with its own model service and engine."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.fatal: str | None = None

    def __serve_build_asgi_app__(self) -> Any:
        # Built here, on the replica, so each replica loads its own engine in the app's
        # lifespan hook (which Ray Serve runs) instead of unpickling a driver's app.
        return create_app(self.settings, on_fatal=self._on_fatal)

    def _on_fatal(self, reason: str) -> None:
        self.fatal = reason

    def check_health(self) -> None:
        """Called by Ray Serve now and then: an app with no working engine gets replaced."""
        if self.fatal:
            raise RuntimeError(f"the engine failed and could not be reloaded: {self.fatal}")


def app(args: dict[str, Any]) -> Application:
    """The application ``serve run part5.combined_app.ray_serve:app key=value ...`` deploys."""
    options = RayServeOptions(**args)
    cpus = options.replica_cpus or options.threads or 1
    return LabServer.options(
        num_replicas=options.num_replicas, ray_actor_options={"num_cpus": cpus}
    ).bind(options.server_settings())
