"""part5/gradio_app.py, launched on loopback and driven with ``gradio_client`` as a user's
browser drives it: chat replies stream and can be stopped, documents are uploaded and
questions answered with sources, and mistakes get a message, not a traceback.

Both modes run: in process (the real default model, one thread) and against the real lab
server (part5/combined_app in a thread, as tests/integration/test_server_api.py starts it).
"""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

from llmlab.rag import NOT_FOUND
from part5 import gradio_app
from part5.combined_app import ServerSettings
from part5.combined_app.background import running_server

DOCS = Path(__file__).resolve().parents[2] / "part3" / "data" / "docs"
HISTORY = DOCS / "history.txt"
QUESTION = "Who founded the makerspace?"
# message, system prompt, max tokens, temperature: the Chat tab's inputs
GREEDY = (gradio_app.SYSTEM_PROMPT, 32, 0)


def free_port() -> int:
    """A TCP port nothing listens on now (Gradio needs a number; it does not take 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched(lab):
    """Launch the app for ``lab`` on a free loopback port; returns (app, client)."""
    app = gradio_app.launch(lab, "127.0.0.1", free_port())
    return app, Client(app.local_url, verbose=False)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The app in process on the default model (it loads on the first chat): (lab, client)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMLAB_HOME", str(tmp_path_factory.mktemp("gradio-home")))
        patch.setenv("LLMLAB_THREADS", "1")
        lab = gradio_app.InProcessLab()
        app, client = launched(lab)
        yield lab, client
        client.close()
        app.close()
        lab.close()


def error_of(client: Client, *args, api_name: str) -> str:
    """The message the user sees when the call fails (it must fail)."""
    with pytest.raises(AppError) as caught:
        client.predict(*args, api_name=api_name)
    return str(caught.value)


@pytest.mark.slow
def test_chat_reply_streams_and_is_not_empty(in_process):
    _, client = in_process
    job = client.submit("Name three colours.", *GREEDY, api_name="/chat")
    final = job.result()
    updates = [text for text in job.outputs() if text]
    assert final.strip()
    assert len(updates) > 3, "the reply should arrive in several pieces"
    for earlier, later in zip(updates, updates[1:], strict=False):
        assert later.startswith(earlier), "each update extends the text shown so far"
    assert updates[-1] == final


@pytest.mark.slow
def test_stop_ends_a_reply_part_way_and_frees_the_model(in_process, monkeypatch):
    lab, client = in_process
    started, closed = threading.Event(), threading.Event()
    finished = []
    real = lab.backend.stream_chat

    def recording(*args, **kwargs):  # the model's stream, noting whether it ran to its end
        try:
            for chunk in real(*args, **kwargs):
                started.set()
                if chunk.finish_reason is not None:
                    finished.append(chunk.finish_reason)
                yield chunk
        finally:
            closed.set()

    monkeypatch.setattr(lab.backend, "stream_chat", recording)
    long_reply = ("Count from 1 to 1000, one number per line.", gradio_app.SYSTEM_PROMPT, 1024, 0)
    job = client.submit(*long_reply, api_name="/chat")
    assert started.wait(300), "the reply never started"
    assert job.cancel()
    assert closed.wait(120), "the model's stream was not closed after the stop"
    assert finished == [], "the reply ran to its end instead of stopping"
    assert job.status().code == Status.CANCELLED
    monkeypatch.undo()
    # The model is free again: the next message gets its reply.
    assert client.predict("Say hello.", *GREEDY, api_name="/chat").strip()


@pytest.mark.slow
def test_an_uploaded_file_answers_a_question_and_is_cited(in_process):
    _, client = in_process
    report = client.predict("makerspace", [handle_file(str(HISTORY))], api_name="/add_documents")
    assert "history.txt: added" in report
    answer, sources = client.predict("makerspace", QUESTION, api_name="/ask")
    assert "Okonkwo" in answer
    assert re.search(r"\[\d\]", answer), "the answer cites its sources"
    assert sources["headers"] == gradio_app.SOURCE_COLUMNS
    assert sources["data"] and {row[1] for row in sources["data"]} == {"history.txt"}
    assert sources["data"][0][0] == 1
    # A question the documents do not answer: said so, with no sources (and no model call).
    answer, sources = client.predict("makerspace", "What is the capital of Peru?", api_name="/ask")
    assert answer == NOT_FOUND
    assert [row for row in sources["data"] if any(row)] == []


def test_an_empty_question_gets_a_message(in_process):
    _, client = in_process
    message = error_of(client, "makerspace", "   ", api_name="/ask")
    assert message == "The question is empty. Type a question about your documents."


def test_asking_before_any_document_says_to_upload_first(in_process):
    _, client = in_process
    message = error_of(client, "nothing-here", QUESTION, api_name="/ask")
    assert message == (
        "There are no documents in collection 'nothing-here' yet. Upload files and press "
        "'Add documents' first."
    )


def test_a_file_type_the_loader_does_not_read_is_refused_with_the_types_it_reads(
    in_process, tmp_path
):
    _, client = in_process
    table = tmp_path / "prices.csv"
    table.write_text("item,price\nday pass,12\n")
    message = error_of(client, "makerspace", [handle_file(str(table))], api_name="/add_documents")
    assert message.startswith("prices.csv: this file type cannot be read. Upload one of: ")
    assert ".md" in message and ".pdf" in message and ".txt" in message


def test_an_empty_chat_message_gets_a_message(in_process):
    _, client = in_process
    message = error_of(client, "  ", *GREEDY, api_name="/chat")
    assert message == "The message is empty: type something to ask."


# ----- against a lab server ----------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    settings = ServerSettings(threads=1, home=tmp_path_factory.mktemp("server-home"), parallel=2)
    with running_server(settings) as url:
        yield url


@pytest.fixture
def server_client(server_url):
    lab = gradio_app.ServerLab(server_url)
    app, client = launched(lab)
    yield client
    client.close()
    app.close()
    lab.close()


@pytest.mark.slow
def test_server_mode_streams_chat_and_answers_from_uploaded_documents(server_client):
    job = server_client.submit("Name three colours.", *GREEDY, api_name="/chat")
    final = job.result()
    assert final.strip() and len([t for t in job.outputs() if t]) > 3
    report = server_client.predict(
        "makerspace", [handle_file(str(HISTORY))], api_name="/add_documents"
    )
    assert "history.txt: added" in report
    answer, sources = server_client.predict("makerspace", QUESTION, api_name="/ask")
    assert "Okonkwo" in answer and re.search(r"\[\d\]", answer)
    assert {row[1] for row in sources["data"]} == {"history.txt"}
    message = error_of(server_client, "other", QUESTION, api_name="/ask")
    assert message.startswith("There are no documents in collection 'other' yet.")


def test_server_mode_with_no_server_says_how_to_start_one():
    lab = gradio_app.ServerLab(f"http://127.0.0.1:{free_port()}")
    app, client = launched(lab)
    try:
        chat = error_of(client, "Hello", *GREEDY, api_name="/chat")
        ask = error_of(client, "makerspace", QUESTION, api_name="/ask")
    finally:
        client.close()
        app.close()
        lab.close()
    assert chat.startswith(f"Cannot reach the model server at {lab.url}/v1")
    assert "python part5/combined_app/scripts/server.py" in chat
    assert ask.startswith(f"Cannot reach the lab server at {lab.url}")
    assert "make serve" in ask


def test_help_shows_the_examples(capsys):
    with pytest.raises(SystemExit) as stopped:
        gradio_app.main(["--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert "python part5/gradio_app.py --server http://127.0.0.1:8000" in out


def test_an_unknown_model_exits_with_the_registry_message(capsys):
    assert gradio_app.main(["--model", "no-such-model"]) == 2
    assert "Unknown model 'no-such-model'" in capsys.readouterr().err
