"""The built-in and user catalogs: reading, merging, finding a name, saving user entries."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import ValidationError

from llmlab.registry.spec import CLI, ModelSpec, RegistryError, UnknownModelError
from llmlab.settings import Settings, get_settings

# The built-in catalog stays at llmlab/models.yaml (package data of llmlab itself).
BUILTIN_CATALOG = Path(__file__).parent.parent / "models.yaml"


def _parse_yaml(text: str):
    """``yaml.safe_load`` through libyaml when it is there (ten times faster on a catalog);
    a broken file is parsed again by the Python loader, which says better where it is."""
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return yaml.safe_load(text)


def _load_entries(path: Path) -> list:
    """The ``models:`` list of a catalog file ([] if there is no file).

    Raises:
        RegistryError: the file cannot be read, is not YAML, or is not ``models: [...]``.
    """
    if not path.exists():
        return []
    fix = "Fix or delete it."
    try:
        data = _parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise RegistryError(
            f"The catalog {path} is not valid YAML ({where}{problem}). {fix}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise RegistryError(
            f"The catalog {path} is not UTF-8 text ({exc.reason} at byte {exc.start}). "
            f"Save it as UTF-8, or delete it."
        ) from exc
    except OSError as exc:
        raise RegistryError(
            f"The catalog {path} cannot be read: {exc.strerror or exc}. {fix}"
        ) from exc
    if data is None:
        return []
    entries = data.get("models") if isinstance(data, dict) else data
    if not isinstance(data, dict) or not isinstance(entries, list | None):
        raise RegistryError(
            f"The catalog {path} must hold 'models:' and a list of entries, e.g. "
            f"'models: [{{name: mine, source: {{kind: path, path: /models/mine.gguf}}}}]'; "
            f"it holds {_kind(entries)}. {fix}"
        )
    return entries or []


def _kind(value: object) -> str:
    """``a string``, ``a number`` ...: what a YAML value is, in words."""
    names = {str: "a string", int: "a number", float: "a number", bool: "true/false",
             dict: "a mapping", list: "a list", type(None): "nothing"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _read_catalog(path: Path, user: bool) -> list[ModelSpec]:
    specs = []
    for number, entry in enumerate(_load_entries(path), start=1):
        if not isinstance(entry, dict):
            raise RegistryError(
                f"Entry {number} of {path} is invalid (it is {_kind(entry)}, not a mapping "
                "with name and source). Fix or delete it."
            )
        try:
            specs.append(ModelSpec(**entry, user=user))
        except (TypeError, ValidationError) as exc:
            first = (
                exc.errors()[0]
                if isinstance(exc, ValidationError)
                else {"loc": (), "msg": str(exc)}
            )
            field = ".".join(str(part) for part in first["loc"]) or "entry"
            raise RegistryError(
                f"Entry {number} of {path} is invalid ({field}: {first['msg']}). Fix or delete it."
            ) from exc
    return specs


def catalog(settings: Settings | None = None) -> list[ModelSpec]:
    """All entries: the built-in catalog with the user's entries merged over it (same ref wins)."""
    settings = settings or get_settings()
    merged = {spec.ref: spec for spec in _read_catalog(BUILTIN_CATALOG, user=False)}
    merged.update({spec.ref: spec for spec in _read_catalog(settings.catalog_path, user=True)})
    return list(merged.values())


def builtin_refs() -> set[str]:
    """The ``name:tag`` of every entry that ships with llmlab."""
    return {spec.ref for spec in _read_catalog(BUILTIN_CATALOG, user=False)}


def find(name: str, settings: Settings | None = None) -> ModelSpec:
    """Look up ``name`` or ``name:tag`` without touching any file.

    A bare name picks the entry marked ``default`` among its versions, else the first.

    Raises:
        UnknownModelError: with close matches and the command that lists the catalog.
    """
    entries = catalog(settings)
    base, _, tag = name.partition(":")
    versions = [s for s in entries if s.name == base and (not tag or s.tag == tag)]
    if versions:
        return next((s for s in versions if s.default), versions[0])
    close = _suggest(name, sorted({s.name for s in entries} | {s.ref for s in entries}))
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"Unknown model {name!r}.{hint} Available: {', '.join(sorted({s.name for s in entries}))}. "
        f"Run: {CLI} list"
    )


def path_instead_of_name(name: str | None) -> str | None:
    """What to tell a user who gave a file path (``*.gguf`` or anything with ``/``) where a
    catalog name goes, e.g. ``--model``; ``None`` when ``name`` is not a path."""
    if not name or not (name.endswith(".gguf") or "/" in name):
        return None
    what = "is a file, not a catalog name" if Path(name).expanduser().exists() else "does not exist"
    return (
        f"{name} {what}. Models are named from the catalog: add your GGUF file with "
        f"{CLI} add PATH --name NAME, then use --model NAME."
    )


def _suggest(name: str, known: list[str], n: int = 3) -> list[str]:
    """Close matches for a mistyped name, also when only its beginning was typed (``smolm2``)."""

    def score(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, name, candidate).ratio()
        prefix = difflib.SequenceMatcher(None, name, candidate[: len(name) + 1]).ratio()
        return max(whole, prefix)

    scored = sorted(((score(c), c) for c in known if ":" not in c or ":" in name), reverse=True)
    return [c for value, c in scored[:n] if value >= 0.6]


def default_spec(settings: Settings | None = None) -> ModelSpec:
    """The catalog entry of the lab's default chat model (``LLMLAB_DEFAULT_MODEL``)."""
    settings = settings or get_settings()
    return find(settings.default_model, settings)


def _user_entries(settings: Settings) -> list[dict]:
    _read_catalog(settings.catalog_path, user=True)  # refuse to rewrite a broken catalog
    return _load_entries(settings.catalog_path)


def _write_user_entries(entries: list[dict], settings: Settings) -> None:
    path = settings.catalog_path
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Your own model entries (model_registry.py add / pull), merged over llmlab/models.yaml.\n"
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        header + yaml.safe_dump({"models": entries}, sort_keys=False, allow_unicode=True)
    )
    tmp.replace(path)  # atomic: a crash never leaves half a catalog


def save_user_entry(spec: ModelSpec, settings: Settings | None = None) -> Path:
    """Write ``spec`` to the user catalog (replacing an entry with the same ref); return its path."""
    settings = settings or get_settings()
    entry = spec.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
    entry["source"] = spec.source.model_dump(mode="json", exclude_defaults=True) | {
        "kind": spec.source.kind
    }
    kept = [
        e for e in _user_entries(settings) if f"{e['name']}:{e.get('tag', 'latest')}" != spec.ref
    ]
    _write_user_entries([*kept, entry], settings)
    return settings.catalog_path
