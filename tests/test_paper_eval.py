"""A CPU smoke run of every workload of ``benchmarks.paper_eval`` at tiny
sizes: real `parrot serve` instances (in threads, for speed), Parrot's SDK
and the request-level clients over HTTP. It checks the structure of the
report, that every call had its asked length and that Parrot and every
baseline wrote the same text; it never asserts a timing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))


def test_every_workload_runs_with_equal_outputs_on_every_mode(tmp_path, default_model_dir, capsys):
    from benchmarks import paper_eval

    report = paper_eval.main(["--workload", "all", "--sizes", "tiny", "--device", "cpu", "--server-mode", "thread",
                              "--client-rtt-ms", "1", "--no-json"])
    payloads = {p["workload"]: p for p in report["workloads"]}
    assert set(payloads) == set(paper_eval.WORKLOADS)
    for name, payload in payloads.items():
        assert set(payload["servers"]) == set(paper_eval.MODES)
        assert "--no-prefix-cache" in payload["servers"]["no-apc"]
        assert "--no-prefix-cache" not in payload["servers"]["throughput"]
        (point,) = payload["points"]
        # Same texts in every mode of a round, greedy, float32: the same outputs (strict on CPU, or main raised).
        assert point["outputs_identical"], point["mismatches"]
        assert {r["mode"] for r in point["runs"]} == set(paper_eval.MODES)
        assert set(point["ratios"]) == (set(paper_eval.MODES) - {"parrot"}) | {"best_apc"}
        best = point["ratios"]["best_apc"]["jct_mean"]
        assert best == min(point["ratios"][m]["jct_mean"] for m in ("latency", "throughput"))
        for run in point["runs"]:
            assert run["apps"] >= 1 and run["jct_mean_s"] > 0 and run["calls_checked"] >= run["apps"]
            assert run["prefill_tokens"] > 0 and run["decode_tokens"] > 0
            if run["mode"] == "parrot":  # where Parrot's calls spent their time, per function
                assert run["parrot_phases_s"] and all("decode_s" in ph for ph in run["parrot_phases_s"].values())
            if run["mode"] == "no-apc":
                assert run["prefix_tokens_saved"] == 0  # the cache is off on that server
            if name in ("chain-chat", "mixed"):
                assert run["chat_requests"] >= 1 and run["chat_s_per_token_mean"] is not None
        prefill = point["medians"]
        if name in ("shared-prompt", "multi-agent"):
            # A shared prefix is computed once with the cache, once per user without it.
            assert prefill["no-apc"]["prefill_tokens"] > prefill["throughput"]["prefill_tokens"]
            assert prefill["parrot"]["prefix_tokens_saved"] > 0
    assert set(payloads["gpts"]["max_rate_under_bound"]) == set(paper_eval.MODES)
    table = capsys.readouterr().out
    assert table.count("| mode | JCT mean s |") == len(paper_eval.WORKLOADS)
    assert table.count("Parrot vs best APC config") == len(paper_eval.WORKLOADS)
    json.dumps(report)  # every figure is plain data


def test_output_length_check_and_server_flags(default_model_dir):
    import argparse

    import pytest

    from benchmarks import paper_eval

    none = argparse.Namespace(server_arg=[], latency_max_running=None, latency_max_step_tokens=None,
                              throughput_max_running=None, throughput_max_step_tokens=None)
    latency = paper_eval.server_args("latency", "paper", 2**30, 8192, none)
    throughput = paper_eval.server_args("throughput", "paper", 2**30, 8192, none)
    step = lambda flags: int(flags[flags.index("--max-step-tokens") + 1])  # noqa: E731
    assert step(latency) < step(throughput)
    assert paper_eval.server_args("parrot", "paper", 2**30, 8192, none) == throughput
    assert paper_eval.kv_bytes_per_token(default_model_dir, "cuda") * 2 == paper_eval.kv_bytes_per_token(default_model_dir, "cpu")
    page = ('parrot_engine_tokens_total{engine="engine-0",kind="prefill"} 10.0\n'
            'parrot_engine_tokens_total{engine="engine-0",kind="cached"} 4.0\n'
            'parrot_kv_blocks{engine="engine-0",state="total"} 64.0\n'
            'parrot_kv_blocks{engine="engine-0",state="free"} 60.0\n')
    assert paper_eval.read_metrics(page) == {"tokens_prefill": 10.0, "tokens_cached": 4.0,
                                             "blocks_total": 64.0, "blocks_free": 60.0}
    with pytest.raises(SystemExit):
        paper_eval.parse_args(["--client-rtt-ms", "-1"])
    with pytest.raises(SystemExit):
        paper_eval.parse_args(["--warmup-rounds", "-1"])


def test_warm_up_rounds_run_every_mode_and_are_not_recorded(default_model_dir, capsys):
    from benchmarks import paper_eval

    report = paper_eval.main(["--workload", "chain", "--sizes", "tiny", "--device", "cpu", "--server-mode", "thread",
                              "--modes", "parrot", "throughput", "--warmup-rounds", "1", "--no-json"])
    (payload,) = report["workloads"]
    assert payload["warmup_rounds"] == 1
    (point,) = payload["points"]
    assert sorted(r["mode"] for r in point["runs"]) == ["parrot", "throughput"]  # the measured round only
    assert all(r["round"] == 1 for r in point["runs"])
    log = capsys.readouterr().err
    assert log.count("warm-up 1/1") == 2 and log.count("(not recorded)") == 2
