"""The serving suite's report: both servers side by side, and the ratios its targets name.

The figures here are made up (no server runs): what is checked is which rows come out and
what each ratio is measured against, not how fast anything is.
"""

from __future__ import annotations

from llmlab.benchmarks import serving
from llmlab.benchmarks.serving import FULL, LoadResult, case, rows_for


def result(clients: int, tokens: int, seconds: float, failures: int = 0) -> LoadResult:
    return LoadResult(clients, seconds, tokens, ttft=[0.1, 0.2, 0.3, 0.4],
                      latency=[1.0] * 4, failures=["APIError: busy"] * failures)  # fmt: skip


def by(rows, case_name, metric):
    (row,) = [r for r in rows if r.case == case_name and r.metric == metric]
    return row


LAB = {1: result(1, 100, 1.0), 4: result(4, 300, 1.0), 8: result(8, 240, 1.0),
       16: result(16, 240, 1.0, failures=1)}  # fmt: skip
REF = {1: result(1, 200, 1.0), 4: result(4, 300, 1.0), 8: result(8, 200, 1.0),
       16: result(16, 220, 1.0)}  # fmt: skip


def test_every_count_of_both_servers_has_throughput_time_to_first_token_and_failures():
    rows = rows_for(LAB, REF, FULL)
    for server in (serving.LAB, serving.LLAMA):
        for n in FULL.client_counts:
            name = case(server, n)
            for metric in ("aggregate tokens/s", "p50 time to first token",
                           "p95 time to first token", "failed requests"):  # fmt: skip
                assert by(rows, name, metric).suite == "serving"
    assert by(rows, "lab server, 1 client", "p50 time to first token").value == 0.2
    assert by(rows, "lab server, 1 client", "p95 time to first token").value == 0.4


def test_the_lab_is_measured_against_llama_server_at_each_count_and_against_itself():
    rows = rows_for(LAB, REF, FULL)
    one = by(rows, "lab server, 1 client", "aggregate tokens/s")
    assert (one.baseline, one.ratio, one.note) == ("llama-server, 1 client", 0.5, "target >= 0.95x")
    eight = by(rows, "lab server, 8 clients", "aggregate tokens/s")
    assert (eight.baseline, eight.ratio, eight.note) == ("llama-server, 8 clients", 1.2,
                                                         "target >= 1.1x")  # fmt: skip
    gain = by(rows, "lab server, 8 clients", "batching gain (tokens/s)")
    assert (gain.baseline, gain.ratio) == ("lab server, 1 client", 2.4)
    failed = by(rows, "lab server, 16 clients", "failed requests")
    assert failed.value == 1 and failed.note == "APIError: busy"
    assert by(rows, "llama-server, 16 clients", "failed requests").note == "target 0"


def test_without_llama_server_only_the_lab_is_reported():
    rows = rows_for(LAB, None, FULL)
    assert {r.case.split(",")[0] for r in rows} == {"lab server"}
    assert by(rows, "lab server, 1 client", "aggregate tokens/s").baseline is None
    assert by(rows, "lab server, 8 clients", "batching gain (tokens/s)").ratio == 2.4


def test_quick_mode_never_builds_llama_server(monkeypatch):
    from llmlab import llama_server

    monkeypatch.delenv(llama_server.ENV, raising=False)
    monkeypatch.setattr(llama_server, "build", lambda **_: (_ for _ in ()).throw(AssertionError))
    assert serving.reference_server(quick=True) is None


def test_side_by_side_runs_each_count_on_both_servers_before_the_next(monkeypatch):
    calls = []

    def fake_clients(url, clients, requests_each, max_tokens, model):
        calls.append((url, clients))
        return result(clients, 100 * clients, 1.0)

    monkeypatch.setattr(serving, "run_clients", fake_clients)
    lab, ref = serving.measure_side_by_side("lab", "ref", FULL, "m")
    assert calls[:2] == [("ref", 1), ("lab", 1)]  # the warm-ups
    assert calls[2:] == [(url, n) for n in FULL.client_counts for url in ("ref", "lab")]
    assert lab[8].tokens == ref[8].tokens == 800


def test_the_per_token_server_is_measured_against_llama_server_measured_again(monkeypatch):
    calls = []

    def fake_clients(url, clients, requests_each, max_tokens, model):
        calls.append((url, clients, requests_each))
        return result(clients, {"lab0": 90, "ref": 100}[url], 1.0)

    monkeypatch.setattr(serving, "run_clients", fake_clients)
    again, per_token = serving.per_token_rows("lab0", "ref", FULL, "m")
    assert calls == [("lab0", 1, 1), ("ref", 1, 4), ("lab0", 1, 4)]  # warm-up, then the pair
    assert (again.case, again.value) == ("llama-server, 1 client, again", 100)
    assert per_token.case == "lab server, an event per token (--stream-interval 0), 1 client"
    assert (per_token.baseline, per_token.ratio) == (again.case, 0.9)
