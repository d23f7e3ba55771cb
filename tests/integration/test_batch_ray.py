"""Batch jobs on Ray (``batch_process.py --ray``) on a local Ray cluster this module starts
(two CPUs, 127.0.0.1 only): the same greedy outputs as a local run, resume after the driver
is killed, a worker that dies (retried once, then an error row), and no ray import
without --ray."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmlab import batch, batch_ray
from llmlab.backends.base import GenerationParams

# Before ray is first imported: a one-node Ray on the loopback interface (see batch_ray).
os.environ.setdefault(batch_ray.LOOPBACK_ENV, "0")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "part3" / "batch_process.py"
_spec = importlib.util.spec_from_file_location("batch_process", SCRIPT)
batch_process = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(batch_process)
pytestmark = pytest.mark.slow
QUESTIONS = ["What is 2+2?", "Name a colour.", "Say hello.", "Name a fruit.", "Name a city."]
FAST = ["--max-tokens", "6", "--parallel", "2", "--n-ctx", "256"]


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module's tests; its address, for a driver in another process."""
    import ray

    batch_ray.connect(None, num_cpus=2)  # ray.init(num_cpus=2) on 127.0.0.1, no dashboard
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)),
        encoding="utf-8",
    )
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def outputs(path: Path) -> dict:
    return {r["id"]: r["output"] for r in lines(path)}


def test_greedy_outputs_equal_the_local_run(tmp_path, capsys, ray_address):
    src = write_jsonl(tmp_path / "in.jsonl", QUESTIONS[:4])
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert batch_process.main([str(src), "-o", str(local), *FAST]) == 0
    capsys.readouterr()
    assert batch_process.main([str(src), "-o", str(on_ray), *FAST, "--ray"]) == 0
    assert "Done: 4 rows" in capsys.readouterr().out
    assert outputs(on_ray) == outputs(local)
    assert all(outputs(on_ray).values())
    assert set(lines(on_ray)[0]) == set(lines(local)[0])  # the same record shape


def test_killed_driver_then_resume_gives_one_line_per_input(tmp_path, ray_address):
    prompts = [f"Write a short poem about the number {i}." for i in range(10)]
    src = write_jsonl(tmp_path / "in.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, str(SCRIPT), str(src), "-o", str(out), "--max-tokens", "48"]
    cmd += ["--parallel", "2", "--n-ctx", "256", f"--ray={ray_address}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text(encoding="utf-8").count("\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert 1 <= out.read_text(encoding="utf-8").count("\n") < len(prompts)

    resume = [str(src), "-o", str(out), "--resume", *FAST, "--ray"]
    assert batch_process.main(resume) == 0
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(len(prompts)))  # none lost or doubled


def test_a_dying_worker_is_retried_once_then_its_row_is_an_error_row(tmp_path, ray_address):
    class DiesOnCrashRows(batch_ray.RowWorker):
        """Sends back the other rows of its call, then its process dies (as on a segfault)."""

        def run(self, rows, params, system, template):
            others = [row for row in rows if row.prompt != "CRASH"]
            yield from batch_ray.RowWorker.run(self, others, params, system, template)
            if len(others) < len(rows):
                os._exit(1)

    rows = list(batch.read_inputs(write_jsonl(tmp_path / "in.jsonl", ["Say hi.", "CRASH", "Hi!"])))
    out = tmp_path / "out.jsonl"
    params = GenerationParams(max_tokens=4, temperature=0)
    with (
        batch_ray.RayRunner(parallel=2, n_ctx=256, chunk=2, worker=DiesOnCrashRows) as runner,
        batch.OutputWriter(out) as writer,
    ):
        for outcome in runner.run(rows, params):
            writer.write(outcome)
    records = {r["id"]: r for r in lines(out)}
    assert len(lines(out)) == 3 and set(records) == {"r0", "r1", "r2"}
    assert records["r0"]["output"] and records["r2"]["output"]
    assert "error" not in records["r0"] and "error" not in records["r2"]
    failed = records["r1"]
    assert failed["output"] is None and failed["finish_reason"] == "error"
    assert failed["error"].startswith("RayWorkerError: the Ray worker running this row failed 2")
    assert "died" in failed["error"]
    assert set(failed) == {"id", "prompt", "output", "finish_reason", "usage", "seconds", "error"}


def test_a_run_without_ray_never_imports_it(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", QUESTIONS[:1])
    out = tmp_path / "out.jsonl"
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(SCRIPT)!r}, {str(src)!r}, '-o', {str(out)!r}, '--max-tokens', '2']\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print('ray imported:', 'ray' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ray imported: False")
    assert len(lines(out)) == 1


def test_ray_usage_errors_exit_2(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", QUESTIONS[:1])
    out = str(tmp_path / "out.jsonl")
    assert batch_process.main([str(src), "-o", out, "--ray", "--engine", "sequential"]) == 2
    assert "drop --engine sequential" in capsys.readouterr().err
    assert batch_process.main([str(src), "-o", out, "--ray-actors", "2"]) == 2
    assert "--ray-actors needs --ray" in capsys.readouterr().err
