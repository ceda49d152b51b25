import cProfile, pstats, io, torch, time
from benchmarks.engine import build_models, prompt, request, run_all
from benchmarks.random_model import shape_config
from parrot.backends.tokenizer import Tokenizer
from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig
from parrot.backends.default_model import default_model_path
model, _, _ = build_models("llama3-8b", torch.device("cuda"), with_hf=False)
tok = Tokenizer(default_model_path()); tok.eos_token_ids = frozenset()
rng = torch.Generator().manual_seed(1)
b = 64
engine = TorchEngine(model, tok, config=TorchEngineConfig(max_running=b, max_step_tokens=8192, prefix_cache=False,
                     kv_cache_bytes=12 << 30, max_model_len=16384))
prompts = [prompt(rng, 512) for _ in range(b)]
run_all(engine, [request(p, 4) for p in prompts])
prof = cProfile.Profile()
for name in ("forward", "sample"):
    fn = getattr(engine.runner, name)
    def wrap(*a, _fn=fn, **k):
        return prof.runcall(_fn, *a, **k)
    setattr(engine.runner, name, wrap)
fn = engine.scheduler.plan
engine.scheduler.plan = lambda *a, _fn=fn, **k: prof.runcall(_fn, *a, **k)
run_all(engine, [request(p, 33) for p in prompts])
s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25); print(s.getvalue()[:6000])
engine.close()
