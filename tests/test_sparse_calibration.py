"""Per-head sparse patterns searched on real attention (parrot.backends.sparse_calibration).

The search runs on the trained default model's queries and keys; the
config it writes loads in the engine, and when every candidate covers all
keys the sparse prefill gives the dense text.
"""

from __future__ import annotations

import asyncio

import pytest

from parrot.backends import Fill, Gen, GenerationRequest
from parrot.backends.sparse_calibration import calibrate, calibration_ids, evaluate, main, record_qkv
from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig
from parrot.kernels import HeadPattern, SparseAttentionConfig
from parrot.semantic_vars import SamplingConfig

pytestmark = pytest.mark.trained

TEXT = (
    "The harbor office opens at seven. Ferries leave every 12 minutes from pier 4, and the night courier "
    "for route 9 is Lindqvist this season. The old bridge was built beside the market hall in 1887.\n"
)


@pytest.fixture(scope="module")
def engine(trained_model_dir):
    e = TorchEngine.from_pretrained(trained_model_dir, device="cpu", config=TorchEngineConfig(max_model_len=1024))
    yield e
    e.close()


def generate(engine: TorchEngine, ids: list[int]) -> tuple[int, ...]:
    async def go():
        stream = engine.submit(GenerationRequest([Fill(tuple(ids)), Gen(SamplingConfig(max_tokens=8))]))
        return await stream.results()

    results, _ = asyncio.run(go())
    return results[0].token_ids


def test_recorded_attention_inputs_have_the_model_shapes(engine):
    ids = calibration_ids(engine.tokenizer, TEXT, 96)
    assert len(ids) == 96
    c = engine.model.config
    layers = record_qkv(engine.model, ids)
    assert len(layers) == c.num_layers
    q, k, v = layers[0]
    assert q.shape == (96, c.num_heads, c.head_dim) and k.shape == v.shape == (96, c.num_kv_heads, c.head_dim)


def test_searched_config_loads_and_gives_the_dense_text_when_patterns_cover_everything(engine, trained_model_dir,
                                                                                      tmp_path):
    ids = calibration_ids(engine.tokenizer, TEXT, 192)
    full = [HeadPattern("a_shape", sink=64, window=len(ids)), HeadPattern("vertical_slash", vertical=len(ids), slash=len(ids))]
    config = calibrate(engine.model, [ids], min_recall=0.95, candidates=full, block_m=16, block_n=16, last_q=16,
                       rows=None)
    c = engine.model.config
    assert len(config.layers) == c.num_layers and all(len(layer) == c.num_heads for layer in config.layers)
    assert config.min_length == len(ids)
    assert all(h["recall"] >= 0.95 for layer in config.meta["layers"] for h in layer["heads"])
    path = tmp_path / "sparse.json"
    config.save(path)
    assert SparseAttentionConfig.load(path).layers == config.layers

    sparse = TorchEngine.from_pretrained(trained_model_dir, device="cpu",
                                         config=TorchEngineConfig(max_model_len=1024, sparse_prefill=str(path),
                                                                  prefix_cache=False))
    try:
        prompt = calibration_ids(engine.tokenizer, TEXT[40:] + TEXT, 200)
        assert generate(sparse, prompt) == generate(engine, prompt)
    finally:
        sparse.close()


def test_search_picks_the_cheapest_pattern_that_reaches_the_target_and_evaluates_held_out(engine):
    ids = calibration_ids(engine.tokenizer, TEXT * 2, 256)
    cands = [HeadPattern("a_shape", sink=16, window=32), HeadPattern("a_shape", sink=16, window=128),
             HeadPattern("vertical_slash", vertical=256, slash=256)]
    config = calibrate(engine.model, [ids], min_recall=0.9, candidates=cands, block_m=16, block_n=16, last_q=16,
                       rows=None)
    kinds = {h for layer in config.layers for h in layer}
    assert kinds <= {*cands, HeadPattern("dense")}
    for layer in config.meta["layers"]:
        for head in layer["heads"]:
            assert head["recall"] >= 0.9 or head["fraction"] >= 0.99  # reached, or the fallback covers all
    held = calibration_ids(engine.tokenizer, TEXT[60:] * 2, 256)
    figures = evaluate(engine.model, config, held, rows=None)
    assert len(figures) == engine.model.config.num_layers
    for f in figures:
        assert 0.0 <= f["recall_min"] <= f["recall_mean"] <= 1.0 + 1e-6
        assert 0.0 < f["fraction"] <= 1.0 + 1e-6 and f["output_error"] >= 0.0
    # A cheaper pattern somewhere: the search does not just pick the widest.
    assert any(h != cands[2] for layer in config.layers for h in layer)


def test_command_line_writes_a_config_the_engine_accepts(trained_model_dir, tmp_path, capsys):
    text = tmp_path / "cal.txt"
    text.write_text(TEXT * 4)
    out, report = tmp_path / "s.json", tmp_path / "r.json"
    assert main(["--model", str(trained_model_dir), "--calibration", str(text), "--held-out", str(text),
                 "--tokens", "128", "--rows", "0", "--out", str(out), "--report", str(report)]) == 0
    config = SparseAttentionConfig.load(out)
    assert len(config.layers) == 30 and "layer 29" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--calibration", str(text), "--out", str(out), "--recall", "1.5"])


def test_serve_settings_carry_the_sparse_config_to_every_torch_engine(tmp_path, monkeypatch):
    from parrot.backends.spec import EngineSpec
    from parrot.cli import build_parser
    from parrot.server.serve import ServerSettings

    path = str(tmp_path / "s.json")
    args = build_parser().parse_args(["serve", "--sparse-config", path])
    assert args.sparse_config == path
    monkeypatch.setenv("PARROT_SPARSE_CONFIG", path)
    settings = ServerSettings.from_env(engines=2)
    assert [s.sparse_config for s in settings.engine_specs()] == [path, path]
    assert EngineSpec(name="e", sparse_config=path).sparse_config == path
