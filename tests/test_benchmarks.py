"""Smoke tests of the benchmark entry points at their smallest sizes.

They check that each benchmark runs end to end and writes the figures it
promises; they never assert a timing (tests assert behaviour, not speed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

TINY = ["--chunks", "2", "--chunk-tokens", "48", "--users", "3", "--rounds", "2", "--roles", "2",
        "--output-tokens", "3", "--system-prompt-tokens", "64", "--repeats", "1", "--no-warmup", "--device", "cpu"]
RUN_KEYS = {"latency_s", "wall_s", "throughput", "calls", "apps", "prefill_tokens", "prefix_tokens_saved",
            "generated_tokens", "decode_tokens", "engine_steps"}


def test_app_workloads_all_four_write_every_figure(tmp_path, default_model_dir, capsys):
    from benchmarks import app_workloads

    out = tmp_path / "apps.json"
    app_workloads.main(["--workload", "all", *TINY, "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "app_workloads"
    ctx = data["context"]
    for key in ("device_name", "torch", "transformers", "model_config", "parameters", "weights", "engine_config", "dtype"):
        assert key in ctx
    assert "random" in ctx["weights"]
    results = {r["workload"]: r for r in data["results"]}
    assert set(results) == {"chain", "map-reduce", "multi-agent", "shared-prompt"}
    for name, res in results.items():
        assert res["outputs_identical"], res["mismatches"]  # CPU float32: Parrot and baseline write the same text
        assert set(res["ratios"]) == {"latency_baseline_over_parrot", "wall_baseline_over_parrot",
                                      "throughput_parrot_over_baseline", "prefill_tokens_baseline_over_parrot"}
        for mode in ("parrot", "baseline"):
            assert RUN_KEYS <= set(res[mode]["median"])
            assert len(res[mode]["runs"]) == 1
        p, b = res["parrot"]["median"], res["baseline"]["median"]
        assert p["calls"] == b["calls"] == res["sizes"]["calls"]
        assert p["generated_tokens"] == b["generated_tokens"] > 0
        assert b["prefix_tokens_saved"] == 0  # the baseline sends no prefix hints
        # The same prompts: what Parrot did not prefill it took from the prefix
        # cache (heads it prefilled early are prompt tokens the baseline never sent).
        assert p["prefill_tokens"] + p["prefix_tokens_saved"] == b["prefill_tokens"] + p["early_prefill_tokens"]
    assert results["shared-prompt"]["parrot"]["median"]["prefix_tokens_saved"] > 0
    assert results["multi-agent"]["parrot"]["median"]["prefix_tokens_saved"] > 0
    assert results["shared-prompt"]["parrot"]["median"]["apps"] == 3
    table = capsys.readouterr().out
    assert "base/parrot" in table and "shared-prompt" in table


def test_app_workloads_compare_early_prefill_on_and_off(tmp_path, default_model_dir, capsys):
    from benchmarks import app_workloads

    out = tmp_path / "early.json"
    app_workloads.main(["--workload", "tool-critic", "--compare", "early-prefill", "--head-tokens", "96",
                        "--producer-tokens", "8", "--tool-ms", "0", *TINY, "--json", str(out)])
    res = json.loads(out.read_text())["results"][0]
    assert res["modes"] == ["early-on", "early-off"] and res["outputs_identical"], res["mismatches"]
    on, off = res["early-on"]["median"], res["early-off"]["median"]
    assert on["early_prefills"] == 1 and off["early_prefills"] == 0
    assert on["prefix_tokens_saved"] >= 96 and off["prefix_tokens_saved"] == 0
    assert on["prefill_tokens"] + on["prefix_tokens_saved"] == off["prefill_tokens"] + on["early_prefill_tokens"]
    assert "early-off/early-on" in capsys.readouterr().out


def test_app_workloads_on_a_random_weight_checkpoint(tmp_path, default_model_dir):
    from benchmarks import app_workloads

    out = tmp_path / "random.json"
    app_workloads.main(["--workload", "shared-prompt", *TINY, "--random-model", "tiny",
                        "--random-model-dir", str(tmp_path / "models"), "--json", str(out)])
    data = json.loads(out.read_text())
    assert "seeded random bf16" in data["context"]["weights"]
    assert data["results"][0]["parrot"]["median"]["prefix_tokens_saved"] > 0


def test_random_model_writer_shards_and_loads(tmp_path, default_model_dir):
    from benchmarks.random_model import parameter_count, shape_config, write_random_model
    from parrot.backends.checkpoint import load_model

    # The real architectures' sizes (Llama-3-8B: 8.03 B parameters; Llama-3.2-1B: 1.24 B, tied embeddings).
    assert round(parameter_count("llama3-8b") / 1e9, 2) == 8.03
    assert round(parameter_count("llama3.2-1b") / 1e9, 2) == 1.24
    assert shape_config("llama3.2-1b")["tie_word_embeddings"] is True
    assert shape_config("llama3-8b")["rope_scaling"]["rope_type"] == "llama3"

    dest = write_random_model("tiny", tmp_path / "tiny", device="cpu", shard_bytes=1 << 20)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # written shard by shard
    model = load_model(dest, device="cpu")
    assert model.config.hidden_size == shape_config("tiny")["hidden_size"]
    again = write_random_model("tiny", tmp_path / "again", device="cpu", shard_bytes=1 << 20)
    a, b = load_model(again, device="cpu").state_dict(), model.state_dict()
    assert all((a[k] == b[k]).all() for k in a)  # seeded: the same weights every time


def test_orchestration_reports_per_call_cost_by_size(tmp_path):
    from benchmarks import orchestration

    out = tmp_path / "orch.json"
    orchestration.main(["--sizes", "50", "200", "--repeats", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [r["size"] for r in rows] == [50, 200]
    for r in rows:
        assert set(r["us_per_call"]) == {"total", "insert", "schedule", "complete", "gc"}
        assert r["calls"] > 0 and r["passes"] > 0
    assert rows[0]["growth_vs_previous"] is None and rows[1]["growth_vs_previous"] is not None


def test_mixed_serving_runs_both_clients_against_one_server(tmp_path, default_model_dir):
    from benchmarks import mixed_serving

    out = tmp_path / "mixed.json"
    data = mixed_serving.main(["--model", str(default_model_dir), "--rounds", "1", "--apps", "2", "--maps", "2",
                               "--chunk-tokens", "40", "--output-tokens", "3", "--chat-tokens", "3",
                               "--chat-rate", "4", "--json", str(out)])
    assert json.loads(out.read_text())["speedup_jct"] == data["speedup_jct"] > 0
    runs = data["runs"]
    assert [(r["round"], r["mode"]) for r in runs] == [(0, "parrot"), (0, "request-level"),
                                                      (1, "request-level"), (1, "parrot")]
    # The Parrot runs read where each map waited from the server's DAG.
    assert all(r["map_placement_s_max"] is not None for r in runs if r["mode"] == "parrot")
    assert data["device"] == "cpu" and data["model_config"]["model_type"]


@pytest.mark.parametrize(
    "module", ["benchmarks.app_workloads", "benchmarks.orchestration", "benchmarks.random_model", "benchmarks.kernels",
               "benchmarks.mixed_serving", "benchmarks.served_engine", "benchmarks.tenant_fairness"]
)
def test_help(module, capsys):
    import importlib

    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_info:
        mod.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_constraints_benchmark_writes_mask_costs_and_throughput(tmp_path, default_model_dir, capsys):
    from benchmarks import constraints

    out = tmp_path / "constraints.json"
    constraints.main(["--device", "cpu", "--batches", "1", "2", "--repeats", "1", "--walks", "1", "--max-tokens", "8",
                      "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "constraints" and "device_name" in data["context"]
    assert {m["kind"] for m in data["mask_cost"]} == {"json_schema", "regex", "choices"}
    assert all(m["tokens"] > 0 and m["fill_us"] > 0 for m in data["mask_cost"])
    assert [d["batch"] for d in data["throughput"]] == [1, 2]
    assert all(d["free_tok_s"] > 0 and d["json_schema_tok_s"] > 0 for d in data["throughput"])
    assert "json_schema" in capsys.readouterr().out


def test_served_engine_compares_both_serve_paths_with_the_engine(tmp_path, default_model_dir):
    from benchmarks import served_engine

    out = tmp_path / "served.json"
    served_engine.main(["--clients", "1", "3", "--prompt-tokens", "16", "--output-tokens", "4", "--repeats", "1",
                        "--device", "cpu", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "served_engine" and data["settings"]["clients"] == [1, 3]
    assert "torch" in data["context"] and "engine_config" in data["context"]
    for row in data["rows"]:
        for path in ("engine", "process", "in_process"):
            assert row[path]["output_tokens"] > 0 and row[path]["tokens_per_s"] > 0
            assert row[path]["ms_per_token_p50"] > 0
        # Greedy: both served paths write the engine's text for every request.
        assert row["process_outputs_identical"] and row["in_process_outputs_identical"]
        assert row["process_over_engine"] > 0 and row["in_process_over_engine"] > 0


def test_tenant_fairness_measures_the_quiet_tenant_alone_and_under_flood(tmp_path, default_model_dir):
    """Structure only: both phases ran in one server and gave figures (no timing asserted)."""
    from benchmarks import tenant_fairness

    out = tmp_path / "fairness.json"
    data = tenant_fairness.main(["--model", str(default_model_dir), "--quiet-clients", "2", "--flood-clients", "3",
                                 "--requests", "1", "--rounds", "1", "--flood-batch", "2", "--flood-tokens", "2",
                                 "--quiet-tokens", "2", "--json", str(out)])
    assert json.loads(out.read_text())["p99_ratio"] == data["p99_ratio"] > 0
    assert data["calls_per_round"] == 2 and data["alone_p50_ms"] > 0 and data["flood_p99_ms"] > 0
    assert data["context"]["device"] == "cpu"
