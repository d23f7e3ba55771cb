"""The combined served app of part 5: an OpenAI-compatible API, document QA, batch jobs,
Prometheus metrics and a web page, all on one shared batched engine.

Start it with ``python part5/combined_app/scripts/server.py`` (or ``make serve``), or
build it in code::

    from part5.combined_app import ServerSettings, create_app
    app = create_app(ServerSettings(parallel=2))
"""

from part5.combined_app.app import create_app
from part5.combined_app.config import ServerSettings

__all__ = ["ServerSettings", "create_app"]
