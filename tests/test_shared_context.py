"""The shared-context benchmark (benchmarks/shared_context.py) at its smallest, on CPU.

The embedded model's weights are random, so this checks the mechanism: the
tasks carry their answers, every setting and mode runs and reports, the
prefix cache saves the shared context's prefill, compression shortens it.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import shared_context as sc


def test_tasks_hold_their_answers():
    tasks = sc.make_tasks(3, 12, 2, list(sc.TASKS))
    assert [t.name for t in tasks] == list(sc.TASKS)
    for t in tasks:
        assert len(t.queries) == 2
        for question, answer in t.queries:
            assert answer and question
            if t.name != "many_shot":  # a label is one of the named classes, not a string to copy
                assert answer in t.context
    hop = tasks[2]
    # Following the chain from the asked variable back to a number gives the answer.
    assign = dict(line[4:].split(" = ") for line in hop.context.splitlines()[1:])
    for question, answer in hop.queries:
        name = question.split("VAR ")[1].split("?")[0]
        value = assign[name]
        while value.startswith("VAR "):
            value = assign[value[4:]]
        assert value == answer
    assert sc.correct(" The value is 4815.", "4815") and not sc.correct("48", "4815")


def test_every_setting_and_mode_runs_and_reports(tmp_path, default_model_dir, capsys):
    out = tmp_path / "sc.json"
    assert sc.main(["--model", str(default_model_dir), "--device", "cpu", "--size", "8", "--queries", "2",
                    "--max-tokens", "2", "--tasks", "kv,multi_hop,report", "--json", str(out)]) == 0
    assert "prefix_cache" in capsys.readouterr().out
    data = json.loads(out.read_text())
    res = data["results"]
    assert set(res) == set(sc.SETTINGS) and all(set(m) == set(sc.MODES) for m in res.values())
    for setting in sc.SETTINGS:
        for mode in sc.MODES:
            for name in ("kv", "multi_hop", "report"):
                r = res[setting][mode][name]
                assert 0.0 <= r["accuracy"] <= 1.0 and r["queries"] == 2 and r["prefill_tokens"] > 0
    # Many requests on one context: the cache computes it once, the baseline every time.
    full, cached = res["full"]["multi_request"], res["prefix_cache"]["multi_request"]
    assert sum(r["prefill_tokens"] for r in cached.values()) < sum(r["prefill_tokens"] for r in full.values())
    assert all(r["prefix_tokens_saved"] > 0 for r in cached.values())
    assert all(r["prefix_tokens_saved"] == 0 for r in full.values())
    # Compression shortens the context, so less is prefilled.
    comp = res["compression"]["multi_request"]
    assert all(r["compression"]["compressed_tokens"] < r["compression"]["original_tokens"] for r in comp.values())
    assert sum(r["prefill_tokens"] for r in comp.values()) < sum(r["prefill_tokens"] for r in full.values())


def test_help_and_bad_options(capsys):
    with pytest.raises(SystemExit) as info:
        sc.main(["--help"])
    assert info.value.code == 0 and "multi-turn" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--tasks"):
        sc.main(["--tasks", "kv,nope"])
