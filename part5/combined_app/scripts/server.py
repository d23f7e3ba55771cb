"""python part5/combined_app/scripts/server.py [--port 8000] [--model NAME] [--parallel 4]

Start the lab's server: the web page at http://127.0.0.1:8000/, an OpenAI-compatible API
under /v1, document QA under /api/collections, batch jobs under /api/batches, /health and
/metrics. ``make serve`` runs this with the defaults. Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a file: make `part5.combined_app` importable

from llmlab import registry  # noqa: E402
from llmlab.backends.base import BackendError  # noqa: E402
from llmlab.finetune.adapters import check_adapter  # noqa: E402
from llmlab.registry import batch_format  # noqa: E402

EPILOG = """examples:
  python part5/combined_app/scripts/server.py                      # http://127.0.0.1:8000/
  python part5/combined_app/scripts/server.py --port 8001 --parallel 8
  python part5/combined_app/scripts/server.py --api-key s3cret     # clients send 'Bearer s3cret'
  python part5/combined_app/scripts/server.py --host 0.0.0.0 --cors http://localhost:3000
  python part5/combined_app/scripts/server.py --lora json-qa=runs/json-qa/json-qa.lora.gguf
  python part5/combined_app/scripts/server.py --exact-model        # the model's file as given

By default the server runs a version of the model whose format llama.cpp multiplies in
batches here (for the shipped Q4_1: a Q8_0 made from it once, KL 0.005 nats/token), when its
KL divergence from the requested file on held-out text is at most 0.02; it says which.

then, from any OpenAI client:
  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="s3cret" or "unused")
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Every option can also be set as an environment variable LLMLAB_SERVER_<OPTION>
(e.g. LLMLAB_SERVER_PORT=8001); the API key also as LLMLAB_API_KEY.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line: server options on top of ServerSettings' environment defaults."""
    parser = argparse.ArgumentParser(
        description="Start the Local LLM Lab server (API, document QA, batch jobs, web page).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", help="interface to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, help="TCP port (default: 8000)")
    parser.add_argument(
        "--model",
        action="append",
        help="chat model to serve (default: the lab's default model); repeat to serve more: "
        "the first is loaded at start, the others on first use",
    )
    parser.add_argument(
        "--models-file",
        help="YAML file with more models, aliases and the rules of model 'auto' "
        "(see part5/combined_app/models.py)",
    )
    parser.add_argument(
        "--alias",
        action="append",
        metavar="NAME=MODEL",
        help="another name for a served model, e.g. --alias fast=smollm2-135m-instruct",
    )
    parser.add_argument(
        "--keep-alive",
        type=float,
        help="seconds a model loaded on first use stays loaded when idle (default: 300; "
        "-1: always)",
    )
    parser.add_argument(
        "--memory-budget",
        type=_size,
        help="memory the loaded models may take, e.g. 2G or 512M (default: 3/4 of the RAM)",
    )
    parser.add_argument("--parallel", type=int, help="requests decoded together (default: 4)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: none)")
    parser.add_argument(
        "--cors",
        action="append",
        metavar="ORIGIN",
        help="browser origin allowed to call the API; repeat or use '*' (default: none)",
    )
    parser.add_argument(
        "--queue-size", type=int, help="requests that may wait for a slot (default: 16)"
    )
    parser.add_argument(
        "--ctx", type=int, dest="n_ctx", help="context window per request in tokens"
    )
    parser.add_argument(
        "--stream-interval",
        type=float,
        metavar="SECONDS",
        help="least time between two events of a stream; the tokens decoded meanwhile go as "
        "one (default: 0.02; 0: an event per token)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: every core)")
    parser.add_argument(
        "--max-tokens-limit", type=int, help="largest max_tokens allowed (default: 1024)"
    )
    parser.add_argument(
        "--lora",
        action="append",
        metavar="NAME=PATH",
        help="load a GGUF LoRA adapter on the model under NAME; repeat for more "
        "(GET /lora-adapters lists them; default: none)",
    )
    parser.add_argument(
        "--cache-entries",
        type=int,
        help="answer repeats of deterministic requests (temperature 0 or a seed) from a cache "
        "of this many replies (default: 0, no cache)",
    )
    parser.add_argument(
        "--cache-ttl", type=float, help="seconds a cached reply stays valid (default: 600)"
    )
    parser.add_argument(
        "--exact-model",
        action="store_true",
        default=None,
        help="serve the model's file exactly as given; by default a batch-friendly version of "
        "it is served when it is nearly the same model (also LLMLAB_EXACT_MODEL=1)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="uvicorn's log level (default: info)",
    )
    return parser


def _size(text: str) -> int:
    """``"2G"``, ``"512M"``, ``"300k"`` or plain bytes as a byte count."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2G or 512M") from None


def _pairs(items: list[str]) -> dict[str, str] | None:
    """``["NAME=VALUE", ...]`` as ``{NAME: VALUE}``; ``None`` if one is not of that form."""
    pairs = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name.strip() or not value.strip():
            return None
        pairs[name.strip()] = value.strip()
    return pairs


def _say(message: str) -> None:
    print(message, flush=True)


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn

    from part5.combined_app import ServerSettings, create_app
    from part5.combined_app.models import ModelPool

    options = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("cors", "log_level", "lora", "model", "alias")
    }
    if args.model:
        options["model"], options["models"] = args.model[0], args.model[1:]
    if args.alias:
        options["aliases"] = _pairs(args.alias)
        if options["aliases"] is None:
            print(
                "--alias takes NAME=MODEL, e.g. --alias fast=smollm2-135m-instruct", file=sys.stderr
            )
            return 2
    if args.cors:
        options["cors_origins"] = [
            o.strip() for item in args.cors for o in item.split(",") if o.strip()
        ]
    if args.lora:
        adapters = _pairs(args.lora)
        if adapters is not None:
            adapters = {name: os.path.expanduser(path) for name, path in adapters.items()}
        options["lora"] = adapters
        if options["lora"] is None:
            print(
                "--lora takes NAME=PATH, e.g. --lora json-qa=runs/json-qa/json-qa.lora.gguf",
                file=sys.stderr,
            )
            return 2
    try:
        settings = ServerSettings(**options)
        spec = registry.resolve(settings.model)  # fail here, not in the background, on a bad name
        if "chat" not in spec.capabilities:
            raise registry.RegistryError(
                f"{spec.ref} is not a chat model (it can do: {', '.join(spec.capabilities)}). "
                "Serve a chat model, e.g. --model smollm2-135m-instruct."
            )
        if spec.format == "gguf":  # a damaged file fails here, not after the server is up
            registry.read_gguf_info(spec.path)
        for path in settings.lora.values():  # ... and so does an adapter for another model
            check_adapter(path, spec)
        ModelPool.validate(settings)  # the other models, aliases and rules, before any wait
        choice = batch_format.choose(spec, exact=settings.exact_model, say=_say)
    except (registry.RegistryError, BackendError) as exc:
        print(exc, file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"Invalid option: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "Interrupted while making the batch-friendly file (nothing half-made is kept). "
            "Start the server again to finish it, or add --exact-model.",
            file=sys.stderr,
        )
        return 130
    if choice.message:
        print(choice.message)
    try:
        if settings.port and not _port_free(settings.host, settings.port):
            print(
                f"Port {settings.port} on {settings.host} is already in use (another server?). "
                "Stop it, or pick another port with --port.",
                file=sys.stderr,
            )
            return 2
    except OSError as exc:
        print(f"Cannot listen on {settings.host}: {exc}. Check --host.", file=sys.stderr)
        return 2
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(f"Serving {spec.ref} with {settings.parallel} parallel slots.")
    print(f"Web page: http://{shown}:{settings.port}/   API: http://{shown}:{settings.port}/v1")
    if settings.api_key:
        print("An API key is required: send 'Authorization: Bearer <key>'.")
    fatal: list[str] = []

    def stop(reason: str) -> None:  # the engine failed and no new one loaded: stop, exit 1
        fatal.append(reason)
        server.should_exit = True

    try:
        app = create_app(settings, on_fatal=stop, spec=choice.spec)
    except (registry.RegistryError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # Ctrl-C: uvicorn has shut down already (as uvicorn.run does)
    except BackendError as exc:
        print(exc, file=sys.stderr)
        return 1
    if fatal:
        print(f"The server stopped: {fatal[0]}", file=sys.stderr)
        return 1
    return 0 if server.started else 3  # 3: uvicorn's code when startup fails (it logged why)


if __name__ == "__main__":
    raise SystemExit(main())
