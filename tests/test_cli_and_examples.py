"""`parrot demo`, `parrot model` and the examples, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_parrot_demo_runs_both_workflows(default_model_dir):
    result = run("-m", "parrot.cli", "demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "== chain summary: 4 chunks" in out
    assert "== map-reduce summary: 4 maps, one reduce, a title ==" in out
    assert out.count("[done on engine-0") == 10
    assert "ran 10 calls" in out
    assert "not meaningful" in out


def test_parrot_model_prints_the_cached_default(default_model_dir):
    result = run("-m", "parrot.cli", "model")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == default_model_dir


def test_parrot_demo_with_a_bad_model_folder_explains(tmp_path):
    result = run("-m", "parrot.cli", "demo", "--model", str(tmp_path))
    assert result.returncode != 0
    assert "no config.json" in result.stderr


@pytest.mark.parametrize("script, calls", [("chain_summary.py", "3 calls"), ("map_reduce.py", "5 calls"),
                                           ("multi_agent.py", "4 calls"), ("shared_system_prompt.py", "4 calls")])
def test_examples_run_on_a_chosen_model(script, calls, tiny_llama_dir):
    result = run(f"examples/{script}", env_extra={"PARROT_MODEL": str(tiny_llama_dir)})
    assert result.returncode == 0, result.stderr
    assert calls in result.stderr
    assert result.stdout.strip()


def test_an_example_runs_unchanged_against_the_service(live_server):
    key = live_server.new_tenant("examples")
    result = run("examples/map_reduce.py", env_extra={"PARROT_URL": live_server.url, "PARROT_API_KEY": key})
    assert result.returncode == 0, result.stderr
    assert "merged:" in result.stdout and "5 calls" in result.stderr
    with live_server.client(key) as c:
        [session] = c.get("/api/v1/sessions").json()["sessions"]
    assert session["calls"] == 5 and not session["open"]
