"""``POST /tokenize`` and ``POST /detokenize``, in llama.cpp server's shape::

    POST /tokenize    {"content": "Hello world", "with_pieces": true}
                      -> {"tokens": [{"id": 19556, "piece": "Hello"}, {"id": 905, "piece": " world"}]}
    POST /detokenize  {"tokens": [19556, 905]}  -> {"content": "Hello world"}

A piece that is not whole UTF-8 characters (a token holding half of one) is its list of
bytes, as llama.cpp sends it. Tokenizing runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from part5.combined_app.errors import responses
from part5.combined_app.replies import Detokenized, TokenPiece, Tokens
from part5.combined_app.schemas import DetokenizeRequest, TextRoute, TokenizeRequest

router = APIRouter(tags=["tokens"], route_class=TextRoute)


def _piece(data: bytes) -> str | list[int]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


@router.post("/tokenize", response_model=Tokens, responses=responses(400, 500, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> Tokens:
    """The token ids of ``content`` (with ``with_pieces``, each id with its text)."""
    service = request.app.state.service
    ids = await run_in_threadpool(
        service.tokenize, body.content, body.add_special, body.parse_special
    )
    if not body.with_pieces:
        return Tokens(tokens=ids)
    pieces = await run_in_threadpool(service.token_bytes, ids)
    return Tokens(
        tokens=[TokenPiece(id=i, piece=_piece(p)) for i, p in zip(ids, pieces, strict=True)]
    )


@router.post("/detokenize", response_model=Detokenized, responses=responses(400, 500, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> Detokenized:
    """The text of a list of token ids (bytes that are not whole characters become U+FFFD)."""
    content = await run_in_threadpool(request.app.state.service.detokenize, body.tokens)
    return Detokenized(content=content)
