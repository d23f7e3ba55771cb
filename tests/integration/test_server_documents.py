"""Document QA and batch routes of the combined app, spoken to with httpx."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from llmlab.backends.base import GenerationParams
from llmlab.rag import DocumentStore
from part5.combined_app import ServerSettings
from part5.combined_app.background import running_server
from part5.combined_app.routes import batches

# threads=1: these tests check behaviour, not speed, and one llama.cpp thread never stalls
# waiting for a second one when other work shares the CPU (many threads can be 20x slower then).

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parents[2] / "part3" / "data" / "docs"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def http(home):
    with (
        running_server(ServerSettings(threads=1, home=home, parallel=2)) as url,
        httpx.Client(base_url=url, timeout=180) as client,
    ):
        yield client


def _upload(http: httpx.Client, collection: str, *names: str, folder: Path = DOCS):
    files = [("files", (name, (folder / name).read_bytes(), "text/plain")) for name in names]
    return http.post(f"/api/collections/{collection}/files", files=files)


def test_upload_list_ask_and_delete_documents(http, home):
    r = _upload(http, "club", "faq.md", "history.txt")
    assert r.status_code == 200, r.text
    assert [f["status"] for f in r.json()["files"]] == ["added", "added"]
    assert (home / "uploads" / "club" / "faq.md").read_bytes() == (DOCS / "faq.md").read_bytes()

    listed = http.get("/api/collections/club/files").json()["files"]
    assert sorted(f["name"] for f in listed) == ["faq.md", "history.txt"]
    assert all(f["uploaded"] and f["chunks"] > 0 for f in listed)
    assert "club" in [c["name"] for c in http.get("/api/collections").json()["collections"]]

    answer = http.post(
        "/api/collections/club/ask", json={"question": "Who founded the makerspace?"}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["found"] and body["answer"]
    assert body["sources"][0]["file"] == "history.txt"
    assert {"n", "file", "location", "score", "text"} <= set(body["sources"][0])

    # Same store as part3/document_qa.py: the collection is there for the library too.
    assert DocumentStore("club", db_dir=home / "rag").count() == sum(f["chunks"] for f in listed)

    gone = http.delete("/api/collections/club/files/faq.md")
    assert gone.status_code == 200 and gone.json()["chunks_removed"] > 0
    assert not (home / "uploads" / "club" / "faq.md").exists()
    assert [f["name"] for f in http.get("/api/collections/club/files").json()["files"]] == [
        "history.txt"
    ]
    assert http.delete("/api/collections/club/files/faq.md").status_code == 404

    assert http.delete("/api/collections/club").status_code == 200
    assert http.get("/api/collections/club/files").status_code == 404
    assert not (home / "uploads" / "club").exists()


def test_upload_again_skips_unchanged_files(http):
    assert _upload(http, "again", "faq.md").status_code == 200
    second = _upload(http, "again", "faq.md").json()
    assert second["files"][0]["status"] == "unchanged"


@pytest.mark.parametrize("name", ["../evil.md", "..\\evil.md", "sub/evil.md", "/etc/evil.md", ".."])
def test_uploads_cannot_write_outside_their_folder(http, home, name):
    r = http.post("/api/collections/safe/files", files=[("files", (name, b"# hi", "text/plain"))])
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "files"
    assert not list(home.rglob("evil.md"))
    assert not (home / "uploads" / "evil.md").exists()


def test_bad_uploads_and_names_are_400_and_unknown_collections_404(http):
    exe = http.post(
        "/api/collections/safe/files", files=[("files", ("tool.exe", b"MZ", "application/x"))]
    )
    assert exe.status_code == 400 and ".md" in exe.json()["error"]["message"]
    bad_name = http.get("/api/collections/a/files")
    assert bad_name.status_code == 400 and bad_name.json()["error"]["code"] == "invalid_collection"
    assert http.get("/api/collections/nothing-here/files").status_code == 404
    missing = http.post("/api/collections/nothing-here/ask", json={"question": "Why?"})
    assert missing.status_code == 404


def _wait_done(http: httpx.Client, job_id: str, seconds: float = 300) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = http.get(f"/api/batches/{job_id}").json()
        if status["status"] not in ("queued", "running"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"batch {job_id} still running after {seconds} s")


def test_batch_job_runs_every_prompt_and_returns_results_in_order(http):
    prompts = [
        "Name a fruit.",
        {"id": "sky", "prompt": "What colour is the sky?"},
        {"messages": [{"role": "user", "content": "Say hello."}]},
    ]
    r = http.post("/api/batches", json={"prompts": prompts, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 202
    job = r.json()
    assert job["total"] == 3 and job["status"] in ("queued", "running")
    status = _wait_done(http, job["id"])
    assert status["status"] == "completed" and status["completed"] == 3 and status["failed"] == 0
    results = http.get(f"/api/batches/{job['id']}/results").json()["results"]
    assert [row["id"] for row in results] == [1, "sky", 3]
    assert all(row["output"] and 0 < row["usage"]["completion_tokens"] <= 8 for row in results)
    assert job["id"] in [j["id"] for j in http.get("/api/batches").json()["data"]]


def test_a_batch_job_keeps_top_k_and_repeat_penalty(http, home):
    # top_k 1 samples only the likeliest token: the batch's sampled reply is the greedy chat
    # reply. (The batch route used to drop top_k and repeat_penalty.)
    prompt = "Name a fruit."
    greedy = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0},
    ).json()["choices"][0]["message"]["content"]
    body = {"prompts": [prompt], "max_tokens": 8, "temperature": 1.0, "seed": 3, "top_k": 1}
    job = http.post("/api/batches", json={**body, "repeat_penalty": 1.0}).json()
    assert _wait_done(http, job["id"])["status"] == "completed"
    [row] = http.get(f"/api/batches/{job['id']}/results").json()["results"]
    assert row["output"] == greedy
    job = http.post("/api/batches", json={**body, "repeat_penalty": 1.3}).json()
    _wait_done(http, job["id"])
    params = json.loads((home / "server-batches" / job["id"] / "job.json").read_text())["params"]
    assert params["top_k"] == 1 and params["repeat_penalty"] == 1.3


def test_batch_errors(http):
    assert http.get("/api/batches/batch_nope").status_code == 404
    empty = http.post("/api/batches", json={"prompts": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompts"
    dup = http.post(
        "/api/batches", json={"prompts": [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}]}
    )
    assert dup.status_code == 400 and "same id" in dup.json()["error"]["message"]


def test_a_running_batch_can_be_cancelled(http):
    prompts = [f"Count from 1 to 100, item {n}." for n in range(6)]
    job = http.post("/api/batches", json={"prompts": prompts, "max_tokens": 200}).json()
    cancelled = http.delete(f"/api/batches/{job['id']}").json()
    assert cancelled["id"] == job["id"]
    status = _wait_done(http, job["id"], 60)
    assert status["status"] == "cancelled" and status["completed"] < 6


def test_a_batch_cut_off_by_a_server_stop_resumes_on_the_next_run(tmp_path):
    settings = ServerSettings(threads=1, home=tmp_path, parallel=2)
    prompts = [{"id": n, "prompt": f"Count from 1 to 30, list number {n}."} for n in range(8)]
    body = {"prompts": prompts, "max_tokens": 48, "temperature": 0}
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=180) as http:
        job = http.post("/api/batches", json=body).json()
        deadline = time.monotonic() + 120
        while http.get(f"/api/batches/{job['id']}").json()["completed"] < 2:
            assert time.monotonic() < deadline, "no rows finished"
            time.sleep(0.1)
    # The server stopped mid-job: what was finished is on disk, the job is resumable.
    folder = settings.batches_dir / job["id"]
    assert json.loads((folder / "job.json").read_text())["status"] == "interrupted"
    before = [json.loads(line) for line in (folder / "output.jsonl").read_text().splitlines()]
    assert 2 <= len(before) < 8
    assert all(row["finish_reason"] != "interrupted" for row in before)

    with running_server(settings) as url, httpx.Client(base_url=url, timeout=180) as http:
        assert job["id"] in [j["id"] for j in http.get("/api/batches").json()["data"]]
        status = _wait_done(http, job["id"])
        results = http.get(f"/api/batches/{job['id']}/results").json()["results"]
    assert status["status"] == "completed" and status["completed"] == 8 and status["failed"] == 0
    assert [row["id"] for row in results] == list(range(8))  # none lost, none run twice
    assert [r for r in results if r["id"] in {b["id"] for b in before}] == before


def test_a_prompt_too_long_for_the_context_is_that_rows_error_and_the_job_completes(http):
    prompts = ["Say hello.", {"id": "long", "prompt": "word " * 2500}, "Name a colour."]
    job = http.post("/api/batches", json={"prompts": prompts, "max_tokens": 8}).json()
    status = _wait_done(http, job["id"])
    assert status["status"] == "completed", status
    assert (status["completed"], status["failed"], status["error"]) == (3, 1, None)
    results = {r["id"]: r for r in http.get(f"/api/batches/{job['id']}/results").json()["results"]}
    assert results[1]["output"] and results[3]["output"]
    error = results["long"]["error"]
    assert error.startswith("ContextOverflowError: ") and "shorter prompt" in error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"prompts": ["Hi \\ud83d"]}', "prompts"),
        ('{"prompts": [{"messages": [{"role": "user", "content": "Hi \\ud83d"}]}]}', "prompts"),
        ('{"prompts": ["Hi"], "system": "Be brief \\udc00"}', "system"),
        ('{"prompts": ["Hi"], "stop": ["\\ud83d"]}', "stop"),
    ],
    ids=["prompt", "message", "system", "stop"],
)
def test_text_that_is_not_unicode_is_refused_and_leaves_no_job_folder(http, home, body, param):
    folders = set((home / "server-batches").glob("*"))
    jobs = len(http.get("/api/batches").json()["data"])
    r = http.post("/api/batches", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    # param is the path to the text (prompts.0, stop.0, ...), starting with the field named here
    assert error["type"] == "invalid_request_error" and error["param"].split(".")[0] == param
    assert set((home / "server-batches").glob("*")) == folders
    assert len(http.get("/api/batches").json()["data"]) == jobs


def test_a_restarted_job_keeps_every_readable_row_and_sets_a_damaged_line_aside(tmp_path):
    settings = ServerSettings(threads=1, home=tmp_path, parallel=2)
    job = batches.BatchJob(
        "batch_damaged",
        settings.batches_dir / "batch_damaged",
        6,
        GenerationParams(max_tokens=4, temperature=0),
        status="running",
    )
    job.folder.mkdir(parents=True)
    job.input_path.write_text(
        "".join(
            json.dumps({"id": n, "prompt": f"Name a number above {n}."}) + "\n" for n in range(6)
        ),
        encoding="utf-8",
    )
    job.save()
    # Rows 0-3 finished in an earlier run (outputs no model would write, so a rerun shows);
    # line 2 was torn. Rows 4 and 5 never ran.
    finished = [
        {
            "id": n,
            "prompt": "p",
            "output": f"kept {n}",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            "seconds": 0.1,
        }
        for n in range(4)
    ]
    lines = [json.dumps(r) for r in finished]
    lines[1] = lines[1][:30]
    job.output_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with running_server(settings) as url, httpx.Client(base_url=url, timeout=180) as http:
        status = _wait_done(http, job.id)
        results = http.get(f"/api/batches/{job.id}/results").json()["results"]
    assert status["status"] == "completed"
    assert (status["completed"], status["total"], status["failed"]) == (6, 6, 0)
    assert [r["id"] for r in results] == list(range(6))  # each once
    assert [r["output"] for r in results if r["id"] in (0, 2, 3)] == ["kept 0", "kept 2", "kept 3"]
    assert (job.folder / "output.jsonl.damaged").read_text(encoding="utf-8") == lines[1] + "\n"


def test_a_job_the_server_cannot_store_leaves_no_folder(http, home, monkeypatch):
    def disk_full(self):
        raise OSError(28, "No space left on device")

    folders = set((home / "server-batches").glob("*"))
    monkeypatch.setattr(batches.BatchJob, "save", disk_full)  # the server runs in this process
    r = http.post("/api/batches", json={"prompts": ["Hi"]})
    assert r.status_code == 500
    assert "No space left on device" in r.json()["error"]["message"]
    assert set((home / "server-batches").glob("*")) == folders


def test_results_skip_lines_that_are_no_record(http, home):
    job = http.post("/api/batches", json={"prompts": ["Say hi."], "max_tokens": 4}).json()
    _wait_done(http, job["id"])
    with (home / "server-batches" / job["id"] / "output.jsonl").open("ab") as f:
        f.write(b"\xff\xfe not text\n[1, 2]\n")  # an edit while the server runs
    r = http.get(f"/api/batches/{job['id']}/results")
    assert r.status_code == 200, r.text
    assert [row["id"] for row in r.json()["results"]] == [1]
