"""The Parrot paper's evaluation (OSDI'24) over HTTP: Parrot's SDK against
request-level baselines of the same `parrot serve` build.

    python -m benchmarks.paper_eval --workload chain [--sizes paper|small|tiny] [--client-rtt-ms 0]
        [--random-model llama3-8b --device cuda] [--sweep V ...] [--rounds N] [--modes ...] [--json PATH]

One `parrot serve` process per mode, all started at once from the same
checkout (each with the same fixed KV pool, ``--kv-pool-tokens``), so the
modes can take turns run by run and no mode's prefix cache serves another:

* ``parrot``: the SDK (``HttpRuntime``) submits each application's whole DAG
  and reads its results with their objective (``perf=``); throughput-config
  server (the engine's objectives take care of latency).
* ``latency``: a request-level client of ``/v1/completions`` (it sends a
  prompt, waits for the output, splices it into the next prompt; independent
  requests go in parallel), automatic prefix cache (APC) on, a
  latency-preferring server: a small step-token cap (``--max-step-tokens``).
* ``throughput``: the same client, APC on, a throughput-preferring server
  (large batches: high ``--max-running`` and ``--max-step-tokens``).
* ``no-apc``: the same client on the throughput config with
  ``--no-prefix-cache`` (the paper's 2023 vLLM baseline).

Workloads (``--workload``; texts are generated, their token lengths match
the paper's; ``--sweep`` sets the swept value):

* ``chain``: chain summary, documents one after another; sweep: output tokens.
* ``chain-chat``: the same with background chat requests arriving as a
  Poisson process; sweep: chat requests/s.
* ``chains``: many chain-summary clients at once; sweep: clients.
* ``map-reduce``: map-reduce summary (maps read for throughput, the reduce
  for latency); sweep: output tokens.
* ``shared-prompt``: N users of one assistant with a 5,107-token system
  prompt, long outputs; sweep: users.
* ``gpts``: several GPTs-style apps, each with its own long system prompt,
  requests at a rising Poisson rate; sweep: requests/s; the report gives the
  highest rate whose mean normalized latency stays under ``--latency-bound``.
* ``multi-agent``: MetaGPT-like coders and reviewers, one branch per file,
  over a shared design, with a KV pool small enough that memory matters
  (``kv_pool_tokens`` of the preset); sweep: branches.
* ``mixed``: chat at 1 request/s alongside 9 map-reduce applications.

Every output has exactly its ``max_tokens`` (``ignore_eos`` in both clients'
sampling; checked on every call: ``usage.completion_tokens`` for the
request-level client, the DAG's ``generated_tokens`` for Parrot). Within a
round every mode runs the same texts, so greedy outputs must agree: on CPU a
difference is an error, on GPU (bf16, where batch composition changes
rounding) a warning recorded as ``outputs_identical: false``. Each round has
fresh texts and the order of the modes alternates round by round.

``--client-rtt-ms`` simulates a client that is not on the server's machine:
every HTTP request either client sends waits that long before it goes out
(one round trip per exchange; simulated, loopback underneath).

Figures per run: JCT per application (mean, p50, p99), chat normalized
latency (seconds per output token), throughput (apps/s), prefill tokens
computed and saved by the prefix cache (the servers' /metrics), peak KV
cache memory in use (sampled from /metrics: used blocks times block bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from benchmarks.app_workloads import _PARTS, _PLACES, _ROLES, _report_sentence, make_text, system_prompt
from benchmarks.harness import host_context, progress, resolve_model, write_json
from benchmarks.http_service import ServerProcess
from benchmarks.mixed_serving import MAP_TEMPLATE, fill, percentile, reduce_template

MODES = ("parrot", "latency", "throughput", "no-apc")
WORKLOADS = ("chain", "chain-chat", "chains", "map-reduce", "shared-prompt", "gpts", "multi-agent", "mixed")
ADMIN_KEY = "pa-bench"
#: Phases of a call in the server's DAG (see parrot.server.dag_view.call_timings).
PHASES = ("placement_s", "engine_queue_s", "prefill_s", "decode_s")
#: Longest context of every server (the longest request here, shared-prompt's, is ~5.6K tokens).
MAX_MODEL_LEN = 8192
Counter = Callable[[str], int]

CHAIN_FIRST = ("You keep a running summary of a long inspection report, reading it one section at a time.\n"
               "Section:\n{{input:chunk}}\nSummary so far:{{output:summary}}")
CHAIN_REFINE = ("You keep a running summary of a long inspection report, reading it one section at a time.\n"
                "Summary so far:{{input:previous}}\nNext section:\n{{input:chunk}}\nRevised summary:{{output:summary}}")
_CHAT_WORDS = ("the a tram line crew signal depot night shift report repair track switch platform wire brake "
               "door sensor schedule delay passenger spare part winter check why how when").split()

# -- sizes ----------------------------------------------------------------------
# ``server``: (max_running, max_step_tokens) of the latency- and the
# throughput-preferring configuration; ``kv_pool_tokens``: every server's KV
# pool, in token positions (bytes follow from the model's shape and dtype).
# The paper sizes are chosen so that each workload's default run (all modes,
# all rounds) takes about 1-2 minutes on one H200 with the Llama-3-8B shape.
_SERVER = {"paper": {"latency": (32, 512), "throughput": (128, 4096)},
           "small": {"latency": (8, 128), "throughput": (64, 1024)},
           "tiny": {"latency": (4, 64), "throughput": (16, 256)}}
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "chain": {
        # The paper: 10 documents, 1,024-token chunks, outputs of 25-100 tokens;
        # its artifact's chain runs read 20 chunks per document. Here 2
        # documents of 10 chunks (10K tokens, arXiv-paper length) per run.
        "paper": {"docs": 2, "chunks": 10, "chunk_tokens": 1024, "sweep": [50], "rounds": 2, "kv_pool_tokens": 80_000},
        "small": {"docs": 2, "chunks": 3, "chunk_tokens": 256, "sweep": [16], "rounds": 2, "kv_pool_tokens": 16_384},
        "tiny": {"docs": 1, "chunks": 2, "chunk_tokens": 48, "sweep": [4], "rounds": 1, "kv_pool_tokens": 4096},
    },
    "chain-chat": {
        "paper": {"docs": 1, "chunks": 10, "chunk_tokens": 1024, "output_tokens": 50, "sweep": [2.0, 3.5],
                  "chat_prompt_tokens": 256, "chat_output_tokens": 64, "rounds": 2, "kv_pool_tokens": 80_000},
        "small": {"docs": 1, "chunks": 3, "chunk_tokens": 256, "output_tokens": 16, "sweep": [2.0],
                  "chat_prompt_tokens": 64, "chat_output_tokens": 16, "rounds": 2, "kv_pool_tokens": 16_384},
        "tiny": {"docs": 1, "chunks": 2, "chunk_tokens": 48, "output_tokens": 4, "sweep": [4.0],
                 "chat_prompt_tokens": 16, "chat_output_tokens": 4, "rounds": 1, "kv_pool_tokens": 4096},
    },
    "chains": {
        "paper": {"chunks": 10, "chunk_tokens": 1024, "output_tokens": 50, "sweep": [10, 25], "rounds": 2,
                  "kv_pool_tokens": 80_000},
        "small": {"chunks": 3, "chunk_tokens": 256, "output_tokens": 16, "sweep": [4], "rounds": 2, "kv_pool_tokens": 16_384},
        "tiny": {"chunks": 2, "chunk_tokens": 48, "output_tokens": 4, "sweep": [3], "rounds": 1, "kv_pool_tokens": 4096},
    },
    "map-reduce": {
        "paper": {"apps": 3, "maps": 16, "chunk_tokens": 1024, "sweep": [50], "rounds": 2, "kv_pool_tokens": 80_000},
        "small": {"apps": 1, "maps": 6, "chunk_tokens": 256, "sweep": [16], "rounds": 2, "kv_pool_tokens": 16_384},
        "tiny": {"apps": 1, "maps": 3, "chunk_tokens": 48, "sweep": [4], "rounds": 1, "kv_pool_tokens": 4096},
    },
    "shared-prompt": {
        # The paper: a 5,107-token prefix, 8/16/32/64 users, outputs of 200-800 tokens.
        "paper": {"system_tokens": 5107, "output_tokens": 400, "sweep": [64], "rounds": 2, "kv_pool_tokens": 80_000},
        "small": {"system_tokens": 1024, "output_tokens": 32, "sweep": [16], "rounds": 2, "kv_pool_tokens": 16_384},
        # Above the engine's in-flight dedup threshold (256 positions), so users
        # arriving together compute the shared prompt once.
        "tiny": {"system_tokens": 288, "output_tokens": 4, "sweep": [4], "rounds": 1, "kv_pool_tokens": 4096},
    },
    "gpts": {
        "paper": {"apps": 4, "system_tokens": 3000, "requests": 32, "output_tokens": 100, "sweep": [4.0, 16.0],
                  "rounds": 2, "kv_pool_tokens": 80_000},
        "small": {"apps": 3, "system_tokens": 512, "requests": 16, "output_tokens": 16, "sweep": [4.0],
                  "rounds": 2, "kv_pool_tokens": 16_384},
        "tiny": {"apps": 2, "system_tokens": 64, "requests": 4, "output_tokens": 4, "sweep": [8.0], "rounds": 1,
                 "kv_pool_tokens": 4096},
    },
    "multi-agent": {
        # The pool holds the shared design and system prompts plus every
        # branch's own tokens only when the shared blocks are shared: 16
        # branches x (1,024 + 2,048 + ~600) tokens do not fit 24,576 positions
        # (3 GiB for the 8B shape in bf16) unshared, so the no-APC server
        # runs fewer branches at a time.
        "paper": {"system_tokens": 1024, "design_tokens": 2048, "code_tokens": 256, "review_tokens": 128,
                  "rounds_per_app": 2, "sweep": [16], "rounds": 2, "kv_pool_tokens": 24_576},
        "small": {"system_tokens": 256, "design_tokens": 512, "code_tokens": 32, "review_tokens": 16,
                  "rounds_per_app": 2, "sweep": [4], "rounds": 2, "kv_pool_tokens": 4096},
        "tiny": {"system_tokens": 128, "design_tokens": 192, "code_tokens": 4, "review_tokens": 4,
                 "rounds_per_app": 1, "sweep": [3], "rounds": 1, "kv_pool_tokens": 4096},
    },
    "mixed": {
        "paper": {"apps": 9, "maps": 8, "chunk_tokens": 1024, "output_tokens": 50, "sweep": [1.0],
                  "chat_prompt_tokens": 256, "chat_output_tokens": 64, "rounds": 2, "kv_pool_tokens": 80_000},
        "small": {"apps": 3, "maps": 4, "chunk_tokens": 256, "output_tokens": 16, "sweep": [1.0],
                  "chat_prompt_tokens": 64, "chat_output_tokens": 16, "rounds": 2, "kv_pool_tokens": 16_384},
        "tiny": {"apps": 2, "maps": 2, "chunk_tokens": 48, "output_tokens": 4, "sweep": [4.0],
                 "chat_prompt_tokens": 16, "chat_output_tokens": 4, "rounds": 1, "kv_pool_tokens": 4096},
    },
}
SWEEP_NAMES = {"chain": "output_tokens", "chain-chat": "chat_rate", "chains": "clients", "map-reduce": "output_tokens",
               "shared-prompt": "users", "gpts": "request_rate", "multi-agent": "branches", "mixed": "chat_rate"}


class OutputLengthError(AssertionError):
    """A call ended before its max_tokens although EOS is ignored: the sides did not do the same work."""


# -- clients ----------------------------------------------------------------------
@dataclass
class AppResult:
    """One application of a run: its JCT and final outputs, in a fixed order."""

    kind: str  # "app" (the workload's application) or "chat" (background chat)
    jct_s: float
    outputs: list[str]
    output_tokens: int = 0  # chat: tokens of the answer (normalized latency = jct / tokens)
    done_at: float = field(default_factory=time.perf_counter)  # made when the application finished


class Client:
    """One run's clients of one server: a request-level ``/v1/completions``
    client, Parrot's SDK, and an undelayed client for checks and metrics."""

    def __init__(self, url: str, key: str, model: str, rtt_s: float) -> None:
        import httpx

        from parrot.semantic_vars.http_runtime import HttpRuntime

        self.model, self.url, self.rtt_s = model, url, rtt_s
        hooks = {"request": [self._delay]} if rtt_s > 0 else {}
        # A fresh loopback connection per request (see benchmarks.http_service).
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {key}"}
        self.http = httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=3600, event_hooks=hooks)
        self.check = httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=600)
        # Not P.connect(): that would also make it the process's default runtime.
        # The SDK gets the same connection limits as the request-level client:
        # httpx's default of 100 would queue a program's concurrent long-polls.
        self.sdk = HttpRuntime(url, api_key=key, request_timeout=3600,
                               client_options={"event_hooks": hooks, "limits": limits})
        self.sessions: list[str] = []  # Parrot sessions to check after the run
        self.requests = 0

    async def _delay(self, request: Any) -> None:
        await asyncio.sleep(self.rtt_s)

    async def complete(self, prompt: str, max_tokens: int) -> str:
        """One request-level completion, greedy, exactly ``max_tokens`` long (checked)."""
        self.requests += 1
        r = await self.http.post("/v1/completions", json={"model": self.model, "prompt": prompt, "temperature": 0,
                                                          "max_tokens": max_tokens, "ignore_eos": True})
        r.raise_for_status()
        body = r.json()
        got = body["usage"]["completion_tokens"]
        if got != max_tokens:
            raise OutputLengthError(f"a completion has {got} tokens, asked {max_tokens}")
        return body["choices"][0]["text"]

    async def check_sessions(self, expected: dict[str, int]) -> tuple[int, dict[str, dict[str, float]]]:
        """Every call of every Parrot session generated its function's max_tokens.
        Returns the calls seen and, per function, the mean of each phase of
        its calls in the server's DAG (placement, engine queue, prefill, decode,
        seconds): where Parrot's time went."""
        calls = 0
        phases: dict[str, dict[str, list[float]]] = {}
        for sid in self.sessions:
            dag = (await self.check.get(f"/api/v1/sessions/{sid}/dag")).json()
            for call in dag["calls"]:
                calls += 1
                want = expected[call["function"]]
                if call["generated_tokens"] != want or call["state"] != "done":
                    raise OutputLengthError(f"{call['function']}: {call['state']}, {call['generated_tokens']} tokens, "
                                            f"asked {want}")
                timings = call.get("timings") or {}
                for phase in PHASES:
                    if timings.get(phase) is not None:
                        phases.setdefault(call["function"], {}).setdefault(phase, []).append(timings[phase])
        means = {fn: {ph: statistics.fmean(v) for ph, v in by.items()} for fn, by in phases.items()}
        return calls, means

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.check.aclose()
        self.sdk.close()


def _fn(template: str, name: str, tokens: int) -> Any:
    """A Parrot function generating exactly ``tokens`` greedy tokens (EOS ignored)."""
    import parrot as P
    from parrot.semantic_vars import SamplingConfig

    return P.SemanticFunction(template, name=name,
                              defaults=SamplingConfig(max_tokens=tokens, temperature=0.0, ignore_eos=True))


async def _session(client: Client, body: Callable[[], Awaitable[list[str]]]) -> tuple[list[str], float]:
    """Run ``body`` inside a Parrot session of ``client``; its outputs and JCT."""
    import parrot as P

    t0 = time.perf_counter()
    async with P.Session(client.sdk) as s:
        outputs = await body()
        jct = time.perf_counter() - t0
    client.sessions.append(s.id)
    return outputs, jct


async def chain_app(client: Client, mode: str, chunks: Sequence[str], tokens: int) -> AppResult:
    """One chain summary: each step reads the previous summary and the next chunk."""
    if mode == "parrot":
        first, refine = _fn(CHAIN_FIRST, "chain_first", tokens), _fn(CHAIN_REFINE, "chain_refine", tokens)

        async def body() -> list[str]:
            summary = first(chunk=chunks[0])
            for chunk in chunks[1:]:
                summary = refine(previous=summary, chunk=chunk)
            return [await summary.aget(perf="latency")]

        outputs, jct = await _session(client, body)
        return AppResult("app", jct, outputs)
    t0 = time.perf_counter()
    summary = await client.complete(fill(CHAIN_FIRST, {"chunk": chunks[0]}), tokens)
    for chunk in chunks[1:]:
        summary = await client.complete(fill(CHAIN_REFINE, {"previous": summary, "chunk": chunk}), tokens)
    return AppResult("app", time.perf_counter() - t0, [summary])


async def map_reduce_app(client: Client, mode: str, chunks: Sequence[str], tokens: int) -> AppResult:
    """Maps over the chunks (read for throughput), one reduce over their outputs (read for latency)."""
    reduce = reduce_template(len(chunks))
    if mode == "parrot":
        mapper, reducer = _fn(MAP_TEMPLATE, "map_findings", tokens), _fn(reduce, f"reduce_{len(chunks)}", tokens)

        async def body() -> list[str]:
            parts = [mapper(chunk=c) for c in chunks]
            merged = reducer(*parts)
            *texts, final = await asyncio.gather(*(p.aget(perf="throughput") for p in parts), merged.aget(perf="latency"))
            return [*texts, final]

        outputs, jct = await _session(client, body)
        return AppResult("app", jct, outputs)
    t0 = time.perf_counter()
    texts = await asyncio.gather(*(client.complete(fill(MAP_TEMPLATE, {"chunk": c}), tokens) for c in chunks))
    final = await client.complete(fill(reduce, {f"part{i}": t for i, t in enumerate(texts)}), tokens)
    return AppResult("app", time.perf_counter() - t0, [*texts, final])


def assistant_template(system: str) -> str:
    # The system prompt is the template's constant head: Parrot sees the
    # shared prefix before any call runs; the request-level client sends it
    # as text and leaves it to the engine's prefix cache.
    return system + "\nQuestion:{{input:question}}\nAnswer:{{output:answer}}"


async def assistant_request(client: Client, mode: str, template: str, name: str, question: str, tokens: int) -> AppResult:
    """One user's question to an assistant with a long system prompt."""
    if mode == "parrot":
        fn = _fn(template, name, tokens)

        async def body() -> list[str]:
            return [await fn(question=question).aget(perf="latency")]

        outputs, jct = await _session(client, body)
        return AppResult("app", jct, outputs, tokens)
    t0 = time.perf_counter()
    answer = await client.complete(fill(template, {"question": question}), tokens)
    return AppResult("app", time.perf_counter() - t0, [answer], tokens)


# A role's system prompt is its template's constant head (as in
# assistant_template); the design is one shared input of every branch.
CODER = ("\nDesign of the service:\n{{input:design}}\nYour file:{{input:file}}\n"
         "Review of your last version:{{input:review}}\nThe code of your file:{{output:code}}")
REVIEWER = ("\nDesign of the service:\n{{input:design}}\nFile under review:{{input:file}}\n"
            "Its code:\n{{input:code}}\nYour review:{{output:review}}")


async def multi_agent_app(client: Client, mode: str, work: dict[str, Any], s: dict[str, Any]) -> AppResult:
    """Coders (one per file) and reviewers over one shared design, ``rounds_per_app`` rounds;
    branches run in parallel, each waits only for its own previous step."""
    code_t, review_t, rounds = s["code_tokens"], s["review_tokens"], s["rounds_per_app"]
    files, design = work["files"], work["design"]
    coder_t, reviewer_t = work["coder_system"] + CODER, work["reviewer_system"] + REVIEWER
    if mode == "parrot":
        coder, reviewer = _fn(coder_t, "coder", code_t), _fn(reviewer_t, "reviewer", review_t)

        async def body() -> list[str]:
            reviews: list[Any] = ["none yet"] * len(files)
            codes: list[Any] = []
            for _ in range(rounds):
                codes = [coder(design=design, file=f, review=r) for f, r in zip(files, reviews)]
                reviews = [reviewer(design=design, file=f, code=c) for f, c in zip(files, codes)]
            values = await asyncio.gather(*(v.aget(perf="latency") for v in [*codes, *reviews]))
            return list(values)

        outputs, jct = await _session(client, body)
        return AppResult("app", jct, outputs)

    async def branch(f: str) -> tuple[str, str]:
        review = "none yet"
        code = ""
        for _ in range(rounds):
            code = await client.complete(fill(coder_t, {"design": design, "file": f, "review": review}), code_t)
            review = await client.complete(fill(reviewer_t, {"design": design, "file": f, "code": code}), review_t)
        return code, review

    t0 = time.perf_counter()
    done = await asyncio.gather(*(branch(f) for f in files))
    return AppResult("app", time.perf_counter() - t0, [c for c, _ in done] + [r for _, r in done])


async def poisson(rng: random.Random, rate: float, count: int | None, stop: asyncio.Event | None,
                  start: Callable[[int], Awaitable[AppResult]]) -> list[AppResult]:
    """Start ``start(i)`` at Poisson arrivals of ``rate``/s: ``count`` of them, or until ``stop``."""
    tasks: list[asyncio.Task[AppResult]] = []
    i = 0
    while (count is None or i < count) and not (stop is not None and stop.is_set()):
        tasks.append(asyncio.create_task(start(i)))
        i += 1
        gap = rng.expovariate(rate)
        if stop is None:
            await asyncio.sleep(gap)
        else:
            try:  # the next arrival, or the end of the run, whichever comes first
                await asyncio.wait_for(stop.wait(), timeout=gap)
            except asyncio.TimeoutError:
                pass
    return list(await asyncio.gather(*tasks))


async def chat_request(client: Client, prompt: str, tokens: int) -> AppResult:
    """A background chat user: always a plain request-level completion."""
    t0 = time.perf_counter()
    text = await client.complete(prompt, tokens)
    return AppResult("chat", time.perf_counter() - t0, [text], tokens)


# -- workloads ------------------------------------------------------------------------
class Texts:
    """Seeded text makers of one round (the same for every mode)."""

    def __init__(self, seed: str, count: Counter) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.count = count

    def chunk(self, tokens: int) -> str:
        return make_text(self.rng, tokens, self.count, _report_sentence)

    def system(self, role: str, intro: str, tokens: int) -> str:
        return system_prompt(self.rng, role, intro, tokens, self.count)

    def chat(self, tokens: int) -> str:
        words: list[str] = [f"Crew question {self.rng.randrange(10**6)}:"]
        while self.count(" ".join(words)) < tokens:
            words += [self.rng.choice(_CHAT_WORDS) for _ in range(8)]
        return " ".join(words) + "\nAnswer:"

    def question(self, i: int) -> str:
        return (f"How do I report the {self.rng.choice(_PARTS)} at {self.rng.choice(_PLACES)} "
                f"(ticket {1000 + i})?")


def _assistant_intro(i: int) -> tuple[str, str]:
    role, intro = _ROLES[i % len(_ROLES)]
    return f"{role}-{i}", f"You are GPT number {i}, the {role} assistant of a tram network. {intro}"


async def run_workload(name: str, client: Client, mode: str, s: dict[str, Any], point: float,
                       texts: Texts) -> tuple[list[AppResult], dict[str, int]]:
    """One run of workload ``name`` at sweep value ``point``; its results and
    each Parrot function's max_tokens (for the length check)."""
    n = int(point)
    if name in ("chain", "chain-chat", "chains"):
        tokens = n if name == "chain" else s["output_tokens"]
        apps = s["docs"] if name != "chains" else n
        docs = [[texts.chunk(s["chunk_tokens"]) for _ in range(s["chunks"])] for _ in range(apps)]
        lengths = {"chain_first": tokens, "chain_refine": tokens}
        if name == "chains":
            return list(await asyncio.gather(*(chain_app(client, mode, d, tokens) for d in docs))), lengths

        async def sequential() -> list[AppResult]:
            return [await chain_app(client, mode, d, tokens) for d in docs]

        if name == "chain":
            return await sequential(), lengths
        return await with_chat(client, sequential(), texts, s, point), lengths
    if name in ("map-reduce", "mixed"):
        tokens = n if name == "map-reduce" else s["output_tokens"]
        apps = [[texts.chunk(s["chunk_tokens"]) for _ in range(s["maps"])] for _ in range(s["apps"])]
        lengths = {"map_findings": tokens, f"reduce_{s['maps']}": tokens}
        if name == "map-reduce":
            return [await map_reduce_app(client, mode, a, tokens) for a in apps], lengths

        async def together() -> list[AppResult]:
            return list(await asyncio.gather(*(map_reduce_app(client, mode, a, tokens) for a in apps)))

        return await with_chat(client, together(), texts, s, point), lengths
    if name == "shared-prompt":
        intro = ("You are the help desk assistant of a tram network's maintenance department. You answer crew "
                 "members' questions and point them to the right procedure.")
        template = assistant_template(texts.system("assistant", intro, s["system_tokens"]))
        questions = [texts.question(i) for i in range(n)]
        tokens = s["output_tokens"]
        results = await asyncio.gather(*(assistant_request(client, mode, template, "assistant", q, tokens)
                                         for q in questions))
        return list(results), {"assistant": tokens}
    if name == "gpts":
        templates = [assistant_template(texts.system(*_assistant_intro(i), s["system_tokens"])) for i in range(s["apps"])]
        picks = [texts.rng.randrange(s["apps"]) for _ in range(s["requests"])]
        questions = [texts.question(i) for i in range(s["requests"])]
        tokens = s["output_tokens"]

        def start(i: int) -> Awaitable[AppResult]:
            return assistant_request(client, mode, templates[picks[i]], f"gpt_{picks[i]}", questions[i], tokens)

        results = await poisson(random.Random(f"{texts.seed}-arrivals"), point, s["requests"], None, start)
        return results, {f"gpt_{i}": tokens for i in range(s["apps"])}
    if name == "multi-agent":
        work = {
            "coder_system": texts.system("coder", _ROLES[1][1], s["system_tokens"]),
            "reviewer_system": texts.system("reviewer", _ROLES[2][1], s["system_tokens"]),
            "design": texts.system("architect", _ROLES[0][1], s["design_tokens"]),
            "files": [f"src/module_{i}.py ({texts.rng.choice(_PARTS)})" for i in range(n)],
        }
        return [await multi_agent_app(client, mode, work, s)], {"coder": s["code_tokens"], "reviewer": s["review_tokens"]}
    raise ValueError(f"unknown workload {name!r}")


async def with_chat(client: Client, apps: Awaitable[list[AppResult]], texts: Texts, s: dict[str, Any],
                    rate: float) -> list[AppResult]:
    """``apps`` with background chat arriving at ``rate``/s until they are done
    (the i-th chat's prompt and arrival are the same in every mode of a round)."""
    stop = asyncio.Event()
    chats = Texts(f"{texts.seed}-chat", texts.count)
    arrivals = random.Random(f"{texts.seed}-arrivals")
    chat = asyncio.create_task(poisson(arrivals, rate, None, stop, lambda i: chat_request(
        client, chats.chat(s["chat_prompt_tokens"]), s["chat_output_tokens"])))
    try:
        results = await apps
    finally:
        stop.set()
    return results + await chat


# -- servers and metrics ---------------------------------------------------------------
def server_args(mode: str, sizes: str, kv_bytes: int, max_model_len: int, overrides: argparse.Namespace) -> list[str]:
    """`parrot serve` flags of ``mode``'s server configuration (the pool must
    hold one request of ``max_model_len``, so it is set below the pool)."""
    config = "latency" if mode == "latency" else "throughput"
    running, step = _SERVER[sizes][config]
    running = getattr(overrides, f"{config}_max_running") or running
    step = getattr(overrides, f"{config}_max_step_tokens") or step
    args = ["--max-running", str(running), "--max-step-tokens", str(step), "--kv-cache-bytes", str(kv_bytes),
            "--max-model-len", str(max_model_len)]
    return args + (["--no-prefix-cache"] if mode == "no-apc" else []) + list(overrides.server_arg)


def kv_bytes_per_token(model_path: Path, device: str) -> int:
    """Bytes one token position of KV takes in the engine's pool (K and V, every layer)."""
    from parrot.backends.checkpoint import read_model_config

    c = read_model_config(model_path)
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * (2 if device.startswith("cuda") else 4)


def read_metrics(text: str) -> dict[str, float]:
    """Engine token counters and KV block gauges from a /metrics page, summed over engines."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "parrot_engine_tokens_total":
                key = f"tokens_{sample.labels['kind']}"
            elif sample.name == "parrot_kv_blocks":
                key = f"blocks_{sample.labels['state']}"
            else:
                continue
            out[key] = out.get(key, 0.0) + sample.value
    return out


class MetricsSampler:
    """Samples a server's /metrics on a thread during a run: counter deltas and peak KV blocks in use."""

    def __init__(self, url: str, interval_s: float = 0.1) -> None:
        self.url, self.interval_s = url, interval_s
        self.peak_used_blocks = 0.0
        self._stop = threading.Event()
        self.before = self.read()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def read(self) -> dict[str, float]:
        import httpx

        r = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        r.raise_for_status()
        m = read_metrics(r.text)
        self.peak_used_blocks = max(getattr(self, "peak_used_blocks", 0.0),
                                    m.get("blocks_total", 0.0) - m.get("blocks_free", 0.0))
        return m

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.read()
            except Exception:  # a missed sample is not an error; the next one comes
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def stop(self) -> dict[str, float]:
        """Stop sampling; the counters' deltas since the start."""
        self.close()
        after = self.read()
        return {k: after.get(k, 0.0) - self.before.get(k, 0.0) for k in ("tokens_prefill", "tokens_cached", "tokens_decode")}


@dataclass
class Server:
    mode: str
    process: Any  # ServerProcess or ThreadedServer: .url, .stop()
    key: str
    model: str
    args: list[str]


class ThreadServer:
    """`parrot serve` with these flags in a thread of this process, its engine
    in-process too (``--server-mode thread``: fast to start, for smoke tests;
    the clients then share this process's GIL with the server)."""

    def __init__(self, model_path: Path, device: str, flags: Sequence[str]) -> None:
        from parrot.cli import build_parser, serve_settings
        from parrot.server.serve import ThreadedServer

        args = build_parser().parse_args(["serve", "--model", str(model_path), "--device", device,
                                          "--engine-in-process", *flags])
        settings = serve_settings(args)
        settings.admin_key = ADMIN_KEY
        self.server = ThreadedServer(settings, ready_timeout_s=600)
        self.url = self.server.url

    def stop(self) -> None:
        self.server.stop()


def start_servers(modes: Sequence[str], model_path: Path, device: str, sizes: str, kv_bytes: int,
                  max_model_len: int, args: argparse.Namespace) -> dict[str, Server]:
    """One `parrot serve` per mode, started side by side; a tenant on each."""
    import httpx

    servers: dict[str, Server] = {}
    errors: list[BaseException] = []

    def start(mode: str) -> None:
        try:
            flags = server_args(mode, sizes, kv_bytes, max_model_len, args)
            env = {"PARROT_STEP_TRACE": str(Path(args.step_trace) / mode)} if args.step_trace else None
            proc = (ThreadServer(model_path, device, flags) if args.server_mode == "thread" else
                    ServerProcess(model_path, device, ADMIN_KEY, ready_timeout_s=1800, extra_args=flags,
                                  extra_env=env))
            key = httpx.post(proc.url + "/admin/v1/tenants", json={"name": f"bench-{mode}"},
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60).json()["api_key"]
            model = httpx.get(proc.url + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                              timeout=60).json()["data"][0]["id"]
            servers[mode] = Server(mode, proc, key, model, flags)
            progress(f"server for {mode}: {' '.join(flags)}")
        except BaseException as exc:  # reported below, after every thread ended
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(m,)) for m in modes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        stop_servers(servers)
        raise errors[0]
    return {m: servers[m] for m in modes}  # in the order asked


def stop_servers(servers: dict[str, Server]) -> None:
    for server in servers.values():
        server.process.stop()


async def warm_up(server: Server, texts: Texts) -> None:
    """Compile and capture on each server before anything is measured: a short chain through the
    SDK and a burst of completions (not counted)."""
    client = Client(server.process.url, server.key, server.model, 0.0)
    try:
        chunks = [texts.chunk(256) for _ in range(2)]
        await chain_app(client, "parrot", chunks, 4)
        await asyncio.gather(*(client.complete(texts.chunk(256), 4) for _ in range(8)))
    finally:
        await client.aclose()


# -- runs and report ----------------------------------------------------------------------
@dataclass
class RunRecord:
    workload: str
    mode: str
    point: float
    round: int
    wall_s: float
    apps: int
    jct_mean_s: float
    jct_p50_s: float
    jct_p99_s: float
    throughput_apps_per_s: float
    chat_requests: int
    chat_s_per_token_mean: float | None
    chat_s_per_token_p50: float | None
    chat_s_per_token_p99: float | None
    app_s_per_token_mean: float | None  # normalized latency of the apps that report output tokens (gpts, shared-prompt)
    prefill_tokens: float
    prefix_tokens_saved: float
    decode_tokens: float
    kv_peak_bytes: float
    requests: int  # HTTP completions sent by the request-level client
    calls_checked: int
    outputs: list[str] = field(default_factory=list, repr=False)
    # Parrot only: per function, the mean seconds of each call phase in the server's DAG.
    parrot_phases_s: dict[str, dict[str, float]] = field(default_factory=dict)


def summarize(workload: str, mode: str, point: float, round_no: int, results: list[AppResult], started: float,
              wall: float, deltas: dict[str, float], kv_peak: float, requests: int, calls: int) -> RunRecord:
    apps = [r for r in results if r.kind == "app"]
    # Throughput over the time the applications took (background chat still
    # in flight after the last application is not theirs).
    apps_wall = max(a.done_at for a in apps) - started
    chats = [r for r in results if r.kind == "chat"]
    jct = [a.jct_s for a in apps]
    chat_norm = [c.jct_s / c.output_tokens for c in chats if c.output_tokens]
    app_norm = [a.jct_s / a.output_tokens for a in apps if a.output_tokens]
    return RunRecord(
        workload, mode, point, round_no, wall, len(apps), statistics.fmean(jct), percentile(jct, 0.5) or 0.0,
        percentile(jct, 0.99) or 0.0, len(apps) / apps_wall, len(chats),
        statistics.fmean(chat_norm) if chat_norm else None, percentile(chat_norm, 0.5), percentile(chat_norm, 0.99),
        statistics.fmean(app_norm) if app_norm else None,
        deltas["tokens_prefill"], deltas["tokens_cached"], deltas["tokens_decode"], kv_peak, requests, calls,
        [o for a in apps for o in a.outputs],
    )


async def one_run(workload: str, server: Server, mode: str, s: dict[str, Any], point: float, round_no: int,
                  texts: Texts, rtt_s: float, block_bytes: int) -> RunRecord:
    client = Client(server.process.url, server.key, server.model, rtt_s)
    sampler = MetricsSampler(server.process.url)
    try:
        t0 = time.perf_counter()
        results, lengths = await run_workload(workload, client, mode, s, point, texts)
        wall = time.perf_counter() - t0
        deltas = sampler.stop()
        calls, phases = await client.check_sessions(lengths) if mode == "parrot" else (client.requests, {})
    finally:
        sampler.close()
        await client.aclose()
    record = summarize(workload, mode, point, round_no, results, t0, wall, deltas,
                       sampler.peak_used_blocks * block_bytes, client.requests, calls)
    record.parrot_phases_s = phases
    return record


_FIGURES = ("jct_mean_s", "jct_p50_s", "jct_p99_s", "throughput_apps_per_s", "chat_s_per_token_mean",
            "chat_s_per_token_p50", "chat_s_per_token_p99", "app_s_per_token_mean", "prefill_tokens",
            "prefix_tokens_saved", "kv_peak_bytes", "wall_s")


def medians(records: Sequence[RunRecord]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in _FIGURES:
        values = [getattr(r, name) for r in records if getattr(r, name) is not None]
        out[name] = statistics.median(values) if values else None
    return out


def ratios(per_mode: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Each baseline over Parrot (> 1: Parrot better) for JCT, chat latency; Parrot over it for throughput."""
    p = per_mode.get("parrot")
    out: dict[str, dict[str, float | None]] = {}
    if not p:
        return out
    for mode, m in per_mode.items():
        if mode == "parrot":
            continue

        def over(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        out[mode] = {"jct_mean": over(m["jct_mean_s"], p["jct_mean_s"]),
                     "jct_p99": over(m["jct_p99_s"], p["jct_p99_s"]),
                     "throughput": over(p["throughput_apps_per_s"], m["throughput_apps_per_s"]),
                     "chat_s_per_token": over(m["chat_s_per_token_mean"], p["chat_s_per_token_mean"]),
                     "prefill_tokens": over(m["prefill_tokens"], p["prefill_tokens"])}
    # The request-level baseline at its best: whichever APC config did better on each figure.
    apc = [out[m] for m in ("latency", "throughput") if m in out]
    if apc:
        out["best_apc"] = {k: min((r[k] for r in apc if r[k] is not None), default=None) for k in apc[0]}
    return out


def format_table(points: list[dict[str, Any]], unit: str) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"| {unit} | mode | JCT mean s | p50 | p99 | apps/s | chat s/token mean | p99 | prefill tok | "
             "saved tok | KV peak MiB | baseline/Parrot JCT |", "|" + " --- |" * 12]
    for pt in points:
        for mode, m in pt["medians"].items():
            ratio = pt["ratios"].get(mode, {}).get("jct_mean")
            lines.append(f"| {pt['point']:g} | {mode} | {fmt(m['jct_mean_s'], '.3f')} | {fmt(m['jct_p50_s'], '.3f')} | "
                         f"{fmt(m['jct_p99_s'], '.3f')} | {fmt(m['throughput_apps_per_s'], '.3f')} | "
                         f"{fmt(m['chat_s_per_token_mean'], '.4f')} | {fmt(m['chat_s_per_token_p99'], '.4f')} | "
                         f"{fmt(m['prefill_tokens'], '.0f')} | {fmt(m['prefix_tokens_saved'], '.0f')} | "
                         f"{fmt((m['kv_peak_bytes'] or 0) / 2**20, '.1f')} | {fmt(ratio, '.2f')} |")
    return "\n".join(lines)


def format_summary(points: list[dict[str, Any]], unit: str) -> str:
    """One line per sweep value: Parrot against the best APC config and against no-APC (> 1: Parrot better)."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    lines = []
    for pt in points:
        parts = []
        for mode, label in (("best_apc", "best APC config"), ("no-apc", "no-APC")):
            r = pt["ratios"].get(mode)
            if r:
                parts.append(f"vs {label}: JCT {fmt(r['jct_mean'])}, throughput {fmt(r['throughput'])}, "
                             f"chat s/token {fmt(r['chat_s_per_token'])}")
        if parts:
            lines.append(f"{unit}={pt['point']:g}: Parrot " + "; ".join(parts)
                         + ("" if pt["outputs_identical"] else "  (outputs differ between modes: bf16)"))
    return "\n".join(lines)


def max_rate_under(points: list[dict[str, Any]], bound: float) -> dict[str, float | None]:
    """Per mode, the highest swept request rate whose mean normalized latency is within ``bound`` s/token."""
    out: dict[str, float | None] = {}
    for pt in points:
        for mode, m in pt["medians"].items():
            out.setdefault(mode, None)
            norm = m["app_s_per_token_mean"]
            if norm is not None and norm <= bound:
                out[mode] = max(out[mode] or 0.0, pt["point"])
    return out


def measure(workload: str, servers: dict[str, Server], s: dict[str, Any], sweep: Sequence[float], rounds: int,
            count: Counter, rtt_s: float, block_bytes: int, strict: bool, warmup_rounds: int = 0) -> list[dict[str, Any]]:
    """Every sweep point: ``warmup_rounds`` unrecorded rounds of every mode
    (each server meets the point's shapes once: graph captures, first-use
    costs), then ``rounds`` rounds, alternating the order; medians and ratios."""
    modes = list(servers)
    points = []
    for point in sweep:
        for warm in range(1, warmup_rounds + 1):
            for mode in modes:
                texts = Texts(f"{workload}-{point}-warm-up-{warm}", count)
                record = asyncio.run(one_run(workload, servers[mode], mode, s, point, 0, texts, rtt_s, block_bytes))
                progress(f"{workload} {SWEEP_NAMES[workload]}={point:g} warm-up {warm}/{warmup_rounds} {mode:<10} "
                         f"JCT mean {record.jct_mean_s:.3f} s (not recorded)")
        records: list[RunRecord] = []
        mismatches: list[str] = []
        for round_no in range(1, rounds + 1):
            order = modes if round_no % 2 else modes[::-1]
            reference: RunRecord | None = None
            for mode in order:
                texts = Texts(f"{workload}-{point}-{round_no}", count)  # the same texts for every mode of a round
                record = asyncio.run(one_run(workload, servers[mode], mode, s, point, round_no, texts, rtt_s, block_bytes))
                records.append(record)
                chat = f", chat {record.chat_s_per_token_mean:.4f} s/token" if record.chat_s_per_token_mean else ""
                progress(f"{workload} {SWEEP_NAMES[workload]}={point:g} round {round_no}/{rounds} {mode:<10} "
                         f"JCT mean {record.jct_mean_s:.3f} s p99 {record.jct_p99_s:.3f} s{chat}  wall {record.wall_s:.2f} s  "
                         f"prefill {record.prefill_tokens:.0f} saved {record.prefix_tokens_saved:.0f}  "
                         f"KV peak {record.kv_peak_bytes / 2**20:.1f} MiB"
                         + "".join(f"\n    {fn}: " + ", ".join(f"{ph[:-2]} {v:.3f} s" for ph, v in by.items())
                                   for fn, by in record.parrot_phases_s.items()))
                if reference is None:
                    reference = record
                elif record.outputs != reference.outputs:
                    first = next((i for i, (a, b) in enumerate(zip(record.outputs, reference.outputs)) if a != b), -1)
                    mismatches.append(f"round {round_no}: {mode} differs from {reference.mode} at output {first}")
        if mismatches:
            message = f"{workload} {point:g}: " + "; ".join(mismatches)
            if strict:
                raise AssertionError(f"greedy outputs differ between modes (they must not on CPU): {message}")
            progress(f"WARNING: {message} (expected only where batching changes bf16 rounding)")
        per_mode = {m: medians([r for r in records if r.mode == m]) for m in modes}
        points.append({"point": point, "medians": per_mode, "ratios": ratios(per_mode),
                       "outputs_identical": not mismatches, "mismatches": mismatches,
                       "runs": [{k: v for k, v in asdict(r).items() if k != "outputs"} for r in records]})
    return points


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", choices=(*WORKLOADS, "all"), default=["chain"],
                        help="one or more workloads, or all (those with the same KV pool share one set of servers)")
    parser.add_argument("--sizes", choices=("paper", "small", "tiny"), default=None,
                        help="preset sizes (default: paper on CUDA, tiny on CPU)")
    parser.add_argument("--sweep", type=float, nargs="+", help="the workload's swept values (see the list above)")
    parser.add_argument("--rounds", type=int, help="rounds of every mode per sweep value (default: the preset's)")
    parser.add_argument("--warmup-rounds", type=int, default=0,
                        help="unrecorded rounds of every mode before each sweep value's measured rounds (default 0; "
                             "the servers' start-up warm-up runs anyway)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--client-rtt-ms", type=float, default=0.0,
                        help="simulated client round trip added before every HTTP request of both clients (default 0)")
    parser.add_argument("--latency-bound", type=float, default=0.05,
                        help="gpts: normalized latency bound, s per output token (default 0.05)")
    parser.add_argument("--kv-pool-tokens", type=int, help="every server's KV pool in token positions (default: the preset's)")
    for config in ("latency", "throughput"):
        parser.add_argument(f"--{config}-max-running", type=int, help=f"the {config} config's batch limit")
        parser.add_argument(f"--{config}-max-step-tokens", type=int, help=f"the {config} config's step-token cap")
    parser.add_argument("--server-mode", choices=("process", "thread"), default="process",
                        help="process: each `parrot serve` in its own process (default, what is measured); "
                             "thread: in threads of this process with in-process engines (quick smoke runs)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for every `parrot serve` (repeatable), e.g. --server-arg=--engine-in-process")
    parser.add_argument("--model", metavar="PATH", help="local HF folder (default: the embedded tiny test model)")
    parser.add_argument("--random-model", choices=("llama3-8b", "llama3.2-1b", "tiny"),
                        help="seeded random bf16 weights of a real shape (timing only)")
    parser.add_argument("--random-model-dir", metavar="PATH", help="where random checkpoints are cached")
    parser.add_argument("--device", help="cpu, cuda ... (default: cuda if available, else cpu)")
    parser.add_argument("--json", metavar="PATH",
                        help="with one workload: write figures and context here (default, and with several: "
                             "JSON_DIR/paper_eval-<host>-<workload>.json)")
    parser.add_argument("--json-dir", metavar="DIR", default="benchmarks/results",
                        help="folder of the default JSON files (default: benchmarks/results)")
    parser.add_argument("--no-json", action="store_true", help="write no JSON file")
    parser.add_argument("--step-trace", metavar="DIR",
                        help="each server's engine writes one JSON line per step to DIR/<mode>-*.jsonl "
                             "(PARROT_STEP_TRACE; process servers only): where the time went")
    args = parser.parse_args(argv)
    if args.client_rtt_ms < 0:
        parser.error("--client-rtt-ms must be >= 0")
    if args.warmup_rounds < 0:
        parser.error("--warmup-rounds must be >= 0")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = args.sizes or ("paper" if args.device.startswith("cuda") else "tiny")
    names = list(WORKLOADS) if "all" in args.workload else list(dict.fromkeys(args.workload))
    model_path, weights = resolve_model(args)
    from parrot.backends.tokenizer import Tokenizer
    from parrot.backends.torch_engine import TorchEngineConfig

    tokenizer = Tokenizer(model_path)
    count: Counter = lambda text: len(tokenizer.encode(text))  # noqa: E731
    from parrot.backends.checkpoint import read_model_config

    positions = read_model_config(model_path).max_position_embeddings
    per_token = kv_bytes_per_token(model_path, args.device)
    block_bytes = per_token * TorchEngineConfig().block_size
    strict = not args.device.startswith("cuda")
    context = {**host_context(args.device), "model_path": str(model_path), "weights": weights,
               "argv": list(sys.argv[1:] if argv is None else argv), "sizes": sizes,
               "client_rtt_ms": args.client_rtt_ms, "client_rtt": "simulated: a sleep before every HTTP request",
               "kv_bytes_per_token": per_token}
    host = "cpu" if not args.device.startswith("cuda") else context["device_name"].split()[-1].lower()
    payloads = []
    # Workloads with the same pool size share one set of servers (their texts differ, so no
    # run is served another's prefixes); a new pool size starts new ones.
    pools: dict[int, list[str]] = {}
    for name in names:
        pools.setdefault(args.kv_pool_tokens or SIZES[name][sizes]["kv_pool_tokens"], []).append(name)
    for pool, group in pools.items():
        max_len = min(MAX_MODEL_LEN, positions, pool - 4 * TorchEngineConfig().block_size)
        progress(f"{', '.join(group)} ({sizes} sizes): modes {args.modes}, KV pool {pool} tokens "
                 f"({pool * per_token / 2**30:.2f} GiB) per server")
        servers = start_servers(args.modes, model_path, args.device, sizes, pool * per_token, max_len, args)
        try:
            for server in servers.values():
                asyncio.run(warm_up(server, Texts("warm-up", count)))
            for name in group:
                payloads.append(run_one_workload(name, servers, sizes, pool, max_len, args, count, context, weights,
                                                 block_bytes, strict, host, per_token, single=len(names) == 1))
        finally:
            stop_servers(servers)
    return {"workloads": payloads}


def run_one_workload(name: str, servers: dict[str, Server], sizes: str, pool: int, max_len: int,
                     args: argparse.Namespace, count: Counter, context: dict[str, Any], weights: str,
                     block_bytes: int, strict: bool, host: str, per_token: int, single: bool) -> dict[str, Any]:
    """Measure workload ``name`` on running servers; print its table and write its JSON."""
    s = dict(SIZES[name][sizes])
    sweep = args.sweep or s["sweep"]
    rounds = args.rounds or s["rounds"]
    progress(f"{name}: {SWEEP_NAMES[name]} {sweep}, {rounds} round(s)")
    points = measure(name, servers, s, sweep, rounds, count, args.client_rtt_ms / 1000, block_bytes, strict,
                     args.warmup_rounds)
    payload = {"benchmark": "paper_eval", "workload": name, "sweep_name": SWEEP_NAMES[name], "sizes": s,
               "kv_pool_tokens": pool, "rounds": rounds, "warmup_rounds": args.warmup_rounds,
               "servers": {m: server_args(m, sizes, pool * per_token, max_len, args) for m in args.modes},
               "context": context, "points": points}
    if name == "gpts":
        payload["latency_bound_s_per_token"] = args.latency_bound
        payload["max_rate_under_bound"] = max_rate_under(points, args.latency_bound)
    print(f"\n{name} ({sizes} sizes, {context['device_name']}, {weights}; medians of {rounds} round(s), "
          f"client RTT {args.client_rtt_ms:g} ms simulated)")
    print(format_table(points, SWEEP_NAMES[name]))
    print(format_summary(points, SWEEP_NAMES[name]))
    if not args.no_json:
        write_json(args.json if args.json and single else
                   Path(args.json_dir) / f"paper_eval-{host}-{name}.json", payload)
    return payload


if __name__ == "__main__":
    main()
