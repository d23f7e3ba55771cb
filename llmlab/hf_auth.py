"""printf '%s' "$TOKEN" | python -m llmlab.hf_auth [--no-validate] [--timeout 3]

Store a Hugging Face access token where huggingface_hub looks for it (``$HF_HOME/token``,
plus a named entry in ``$HF_HOME/stored_tokens``), so gated downloads such as
``registry.pull()`` of an ``hf:`` entry work. The token is read from standard input, never
from the command line (anyone on the machine can read a process's arguments), and is
never printed. ``part3/scripts/huggingface_login.sh`` is the friendly front end::

    from llmlab import hf_auth
    result = hf_auth.store_token(token)        # validated with the Hub when it is reachable
    result.path, result.validated, result.note

Offline the token is stored anyway and validation is skipped with a note:
``huggingface_hub.login()`` always asks the Hub who the token belongs to first, so this
module checks with ``whoami`` itself (after a quick reachability probe) and saves with
huggingface_hub's own token-file helpers, which are the same ones ``login()`` uses.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

OFFLINE_TOKEN_NAME = "llmlab"  # name of the stored entry when the Hub cannot tell us its own
TOKENS_PAGE = "https://huggingface.co/settings/tokens"


class TokenError(ValueError):
    """The token is empty or malformed; nothing was stored."""


class TokenRejectedError(TokenError):
    """The Hub said the token is not valid; nothing was stored."""


@dataclass(frozen=True)
class LoginResult:
    """What :func:`store_token` did: where the token went and whether the Hub accepted it."""

    path: Path
    validated: bool
    token_name: str
    user: str | None = None
    note: str = ""


def clean_token(raw: str | None) -> str:
    """The token without surrounding whitespace.

    Raises:
        TokenError: it is empty, contains spaces, or is an organization token.
    """
    token = (raw or "").strip()
    if not token:
        raise TokenError(
            f"The token is empty. Create one at {TOKENS_PAGE} (read access is enough)."
        )
    if any(ch.isspace() for ch in token):
        raise TokenError("The token contains spaces or line breaks; paste only the token itself.")
    if token.startswith("api_org"):
        raise TokenError(
            "That is an organization token; use a personal access token from " + TOKENS_PAGE
        )
    return token


def hub_endpoint() -> str:
    """The Hub address: ``HF_ENDPOINT`` (a mirror) if set, else huggingface.co."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hub answers within ``timeout`` seconds, and if not, why (a short phrase)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False, "HF_HUB_OFFLINE is set"
    import httpx

    endpoint = hub_endpoint()
    try:
        httpx.head(endpoint, timeout=timeout)  # any HTTP answer means the Hub is reachable
    except httpx.HTTPError as exc:
        return False, f"{endpoint} cannot be reached ({type(exc).__name__})"
    return True, ""


def token_path() -> Path:
    """The file huggingface_hub reads the active token from (``$HF_HOME/token``)."""
    from huggingface_hub import constants

    return Path(constants.HF_TOKEN_PATH)


def _save(token: str, token_name: str) -> Path:
    # The helpers huggingface_hub.login() itself uses: an owner-only stored_tokens entry,
    # then that entry made the active token in HF_TOKEN_PATH.
    from huggingface_hub._login import _set_active_token
    from huggingface_hub.utils._auth import _save_token

    _save_token(token=token, token_name=token_name)
    _set_active_token(token_name=token_name, add_to_git_credential=False)
    return token_path()


def store_token(token: str, *, validate: bool = True, timeout: float = 3.0) -> LoginResult:
    """Check ``token`` with the Hub when it is reachable, then store it for huggingface_hub.

    Args:
        token: a Hugging Face access token (``hf_...``).
        validate: ask the Hub whose token it is (skipped anyway when offline).
        timeout: seconds to wait for the Hub before treating this machine as offline.

    Returns:
        A :class:`LoginResult`; ``validated`` is False when the check was skipped.

    Raises:
        TokenError: the token is empty or malformed (nothing stored).
        TokenRejectedError: the Hub rejected it (nothing stored).
    """
    token = clean_token(token)
    if not validate:
        return LoginResult(
            _save(token, OFFLINE_TOKEN_NAME),
            False,
            OFFLINE_TOKEN_NAME,
            note="validation skipped (--no-validate)",
        )
    online, why = hub_reachable(timeout)
    if not online:
        note = f"validation skipped: {why}; the token is checked on your first gated download"
        return LoginResult(_save(token, OFFLINE_TOKEN_NAME), False, OFFLINE_TOKEN_NAME, note=note)

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi(endpoint=hub_endpoint()).whoami(token=token)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise TokenRejectedError(
                f"The Hub rejected this token (HTTP {status}). Copy it again from {TOKENS_PAGE}."
            ) from None
        note = f"validation skipped: the Hub answered HTTP {status}"
        return LoginResult(_save(token, OFFLINE_TOKEN_NAME), False, OFFLINE_TOKEN_NAME, note=note)
    except (OSError, ConnectionError) as exc:  # the network went away after the probe
        note = f"validation skipped: {type(exc).__name__} while contacting the Hub"
        return LoginResult(_save(token, OFFLINE_TOKEN_NAME), False, OFFLINE_TOKEN_NAME, note=note)
    user = info.get("name")
    access = (info.get("auth") or {}).get("accessToken") or {}
    name = access.get("displayName") or f"llmlab-{user}"
    role = access.get("role")
    note = f"valid token of user {user}" + (f" ({role} access)" if role else "")
    return LoginResult(_save(token, name), True, name, user=user, note=note)


EPILOG = """examples:
  bash part3/scripts/huggingface_login.sh                 the friendly way (hidden prompt)
  printf '%s' "$HF_TOKEN" | python -m llmlab.hf_auth      store the token in $HF_TOKEN
  python -m llmlab.hf_auth --no-validate < token.txt      store without asking the Hub
"""


def main(argv: list[str] | None = None) -> int:
    """Read the token from stdin, store it, print one line about what happened."""
    parser = argparse.ArgumentParser(
        description="Store a Hugging Face token (read from standard input) for gated downloads.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--no-validate", action="store_true", help="do not ask the Hub whether the token is valid"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        help="seconds to wait for the Hub (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        result = store_token(sys.stdin.read(), validate=not args.no_validate, timeout=args.timeout)
    except TokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, TokenRejectedError) else 2
    print(f"Token stored in {result.path} (as '{result.token_name}'); {result.note}.")
    if os.environ.get("HF_TOKEN"):
        print(
            "note: HF_TOKEN is set here; while it is set, it is used instead of the stored token."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
