"""The Parrot paper's four application shapes: Parrot vs the request-level baseline.

    python -m benchmarks.app_workloads [--workload all] [--compare baseline|early-prefill] [--json out.json]

Workloads (prompts written for this benchmark; sizes are options):

* ``chain``: chain summarization of a long document: step k reads the
  summary of step k-1 and chunk k. One app; latency is read on the final
  summary.
* ``map-reduce``: one summary per chunk (read with perf="throughput"), then
  one reduce over all of them (read with perf="latency").
* ``multi-agent``: a software team (architect, coder, reviewer, tester, ...)
  for several rounds. Every role has its own long system prompt, the same in
  every round; each role reads the outputs of the roles before it in that
  round (the architect reads the previous round's last output); a team lead
  summarizes the last round.
* ``shared-prompt``: K users of one assistant with a long system prompt, each
  asking a different short question in a session of their own, all at once
  (asyncio, ``aget``); throughput in apps/s.

Two more shapes measure early prefill (``--compare early-prefill``: Parrot
with it on vs off, alternating; see parrot/dataflow/early_prefill.py), not
part of ``all``:

* ``critic``: a writer generates a draft of ``--producer-tokens`` tokens (the
  slow producer), then a critic with a long constant instruction head of
  ``--head-tokens`` tokens reviews it; latency is read on the critique.
* ``tool-critic``: the same critic, but the draft comes from a tool that the
  client runs for ``--tool-ms`` ms before it sets the value (the engine is
  idle meanwhile, which is where a head prefilled early pays most).

Parrot mode sends each app's DAG at its first read; the runtime dispatches
dependent calls itself, batches task groups and prefills shared prefixes
once. The baseline (``request_level=True``) is the same engines driven
request by request: the client reads every input before it submits the call
that needs it, FIFO placement, no prefix hints. Both modes run the same
prompts greedily with a fixed ``max_tokens`` and no stop strings, so they do
the same work and must produce the same text (checked).

With the embedded tiny model or ``--random-model`` the weights are random:
the text is meaningless and a call may end early at an EOS token, identically
in both modes; the tables report generated tokens for both.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import parrot as P
from parrot.semantic_vars import SamplingConfig

from benchmarks.harness import (
    ProgramResult,
    add_engine_args,
    build_engines,
    close_engines,
    describe_context,
    format_table,
    measure,
    progress,
    resolve_model,
    write_json,
)

WORKLOADS = ("chain", "map-reduce", "multi-agent", "shared-prompt")
#: Workloads of the early-prefill comparison (not in "all").
EARLY_WORKLOADS = ("critic", "tool-critic")
#: What ``--compare`` pits against what: (candidate, reference) modes of the harness.
COMPARISONS = {"baseline": ("parrot", "baseline"), "early-prefill": ("early-on", "early-off")}
Counter = Callable[[str], int]  # text -> tokens


# -- text ---------------------------------------------------------------------
# A made-up inspection report of a regional tram network: varied enough that
# chunks differ, plain enough that any tokenizer handles it.
_PLACES = ["Harbor Gate", "Old Mill", "Cedar Hill", "North Yard", "Lantern Square", "Riverside", "Quarry Road",
           "Museum Loop", "Saltmarsh", "Beacon Park", "Foundry Lane", "Willow Bend"]
_PARTS = ["overhead wire", "track switch", "platform edge", "signal relay", "traction substation", "rail joint",
          "ticket machine", "door sensor", "brake pad set", "pantograph", "drainage channel", "passenger display"]
_FINDINGS = ["showed early wear", "was replaced ahead of schedule", "failed a load test", "passed inspection",
             "needs a second look after the winter", "was cleaned and recalibrated", "caused two short delays",
             "is waiting for a spare part", "was moved to the night maintenance plan", "met every tolerance"]
_CAUSES = ["heavy rain", "a loose bolt", "salt spray", "an old firmware version", "vibration from freight traffic",
           "a supplier delay", "unusual heat", "a cracked housing", "worn insulation", "debris on the line"]
_NOTES = [
    "The crew logged the work in the shared maintenance book before the first service of the day.",
    "Ridership on the line stayed close to the seasonal average during the repairs.",
    "A temporary speed limit applied on that section until the follow-up check.",
    "The depot manager asked for photos of every replaced part for the supplier claim.",
    "Night shifts were extended by one hour to finish the work without closing the line.",
    "The control room received no passenger complaints about the change.",
]


def _report_sentence(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(_NOTES)
    return (f"At {rng.choice(_PLACES)} the {rng.choice(_PARTS)} {rng.choice(_FINDINGS)}; "
            f"the likely cause was {rng.choice(_CAUSES)}, and {rng.randint(2, 40)} trips were affected in week "
            f"{rng.randint(1, 52)}.")


def make_text(rng: random.Random, tokens: int, count: Counter, sentence: Callable[[random.Random], str]) -> str:
    """Sentences from ``sentence`` until the text has at least ``tokens`` tokens."""
    parts: list[str] = []
    approx = 0
    while approx < tokens:
        s = sentence(rng)
        parts.append(s)
        approx += count(" " + s)
    return " ".join(parts)


_ROLES = [
    ("architect", "You are the software architect of a small team building a service for tram maintenance crews. "
     "You turn the project brief and the team's feedback into a short, concrete plan for this round."),
    ("coder", "You are the lead programmer of the team. You read the architect's plan and write the code "
     "changes it needs, naming files, functions and data structures precisely."),
    ("reviewer", "You are the code reviewer of the team. You read the plan and the code change and point out "
     "bugs, unclear names, missing error handling and risky shortcuts."),
    ("tester", "You are the test engineer of the team. You read the plan, the code and the review, and list "
     "the tests that must pass before the change ships, edge cases first."),
    ("operator", "You run the service in production. You read everything the team wrote this round and say "
     "what could break at three in the morning and how the on-call engineer would notice."),
    ("writer", "You write the team's user documentation. You read the round's work and describe the change "
     "for crew members who never read code."),
]
_TOPICS = ["logging", "naming", "error messages", "database migrations", "time zones", "retries", "caching",
           "configuration", "tests", "code review", "deployments", "monitoring", "access control", "backups",
           "performance", "documentation", "dependencies", "feature flags", "input validation", "concurrency"]
_VERBS = ["Always", "Never", "Prefer to", "Remember to", "Take care to", "Make sure to", "Try to", "Avoid trying to"]
_ACTIONS = ["explain the trade-off behind", "write down the reason for", "ask about the owner of", "keep it simple when touching",
            "check twice anything that concerns", "mention the cost of", "think about rollback when changing",
            "point to an example of", "split into small steps any work on", "estimate the risk of"]


def _guideline(role: str) -> Callable[[random.Random], str]:
    counter = [0]

    def sentence(rng: random.Random) -> str:
        counter[0] += 1
        return (f"Rule {counter[0]} for the {role}: {rng.choice(_VERBS).lower()} {rng.choice(_ACTIONS)} {rng.choice(_TOPICS)}, because {rng.choice(_CAUSES)} once hurt a team like ours.")

    return sentence


def system_prompt(rng: random.Random, role: str, intro: str, tokens: int, count: Counter) -> str:
    """A long role prompt: ``intro`` then numbered guidelines up to ~``tokens`` tokens."""
    rest = max(0, tokens - count(intro))
    return intro + ("\n" + make_text(rng, rest, count, _guideline(role)) if rest else "")


# -- workloads ----------------------------------------------------------------
def _fn(template: str, name: str, output_tokens: int) -> P.SemanticFunction:
    """Greedy, exactly ``output_tokens`` at most, no stop strings."""
    return P.SemanticFunction(template, name=name, defaults=SamplingConfig(max_tokens=output_tokens, temperature=0.0))


@dataclass
class ChainSummary:
    chunks: list[str]
    output_tokens: int
    count: Counter
    name: str = "chain"
    unit: str = "calls"

    def __post_init__(self) -> None:
        head = "You keep a running summary of a long inspection report, reading it one section at a time.\n"
        self.first = _fn(head + "Section 1:\n{{input:chunk}}\nSummary so far:{{output:summary}}", "chain_first", self.output_tokens)
        self.refine = _fn(
            head + "Summary so far:{{input:previous}}\nNext section:\n{{input:chunk}}\nRevised summary:{{output:summary}}",
            "chain_refine", self.output_tokens,
        )

    def sizes(self) -> dict[str, Any]:
        return {"chunks": len(self.chunks), "chunk_tokens": [self.count(c) for c in self.chunks],
                "output_tokens": self.output_tokens, "calls": len(self.chunks)}

    def run(self, runtime: Any) -> ProgramResult:
        started = time.perf_counter()
        with P.Session(runtime):
            summary = self.first(self.chunks[0])
            for chunk in self.chunks[1:]:
                summary = self.refine(summary, chunk)
            final = summary.get(perf="latency")
            latency = time.perf_counter() - started
        return ProgramResult([final], latency)


@dataclass
class MapReduceSummary:
    chunks: list[str]
    output_tokens: int
    count: Counter
    name: str = "map-reduce"
    unit: str = "calls"

    def __post_init__(self) -> None:
        self.mapper = _fn(
            "You read one part of a long inspection report and list its most important findings.\n"
            "Part:\n{{input:chunk}}\nFindings:{{output:findings}}",
            "map_findings", self.output_tokens,
        )
        notes = "\n".join(f"Findings of part {i + 1}:{{{{input:part{i}}}}}" for i in range(len(self.chunks)))
        self.reducer = _fn(
            f"Merge the findings of every part of an inspection report into one summary.\n{notes}\n"
            "Summary:{{output:summary}}",
            f"reduce_{len(self.chunks)}", self.output_tokens,
        )

    def sizes(self) -> dict[str, Any]:
        return {"chunks": len(self.chunks), "chunk_tokens": [self.count(c) for c in self.chunks],
                "output_tokens": self.output_tokens, "calls": len(self.chunks) + 1}

    def run(self, runtime: Any) -> ProgramResult:
        started = time.perf_counter()
        with P.Session(runtime):
            parts = [self.mapper(c) for c in self.chunks]
            merged = self.reducer(*parts)  # the baseline's client reads every part here
            texts = [p.get(perf="throughput") for p in parts]
            final = merged.get(perf="latency")
            latency = time.perf_counter() - started
        return ProgramResult([*texts, final], latency)


@dataclass
class MultiAgent:
    brief: str
    prompts: list[tuple[str, str]]  # (role, long system prompt)
    rounds: int
    output_tokens: int
    count: Counter
    name: str = "multi-agent"
    unit: str = "calls"
    functions: list[P.SemanticFunction] = field(default_factory=list)

    def __post_init__(self) -> None:
        roles = [r for r, _ in self.prompts]
        for i, (role, prompt) in enumerate(self.prompts):
            lines = [prompt, "Project brief:{{input:brief}}"]
            if i == 0:
                lines.append("Feedback from the previous round:{{input:feedback}}")
            lines += [f"The {roles[j]} wrote:{{{{input:from_{roles[j]}}}}}" for j in range(i)]
            lines.append(f"Your contribution as the {role}:{{{{output:contribution}}}}")
            self.functions.append(_fn("\n".join(lines), role, self.output_tokens))
        outs = "\n".join(f"The {r} wrote:{{{{input:{r}}}}}" for r in roles)
        self.lead = _fn(
            "You lead the team. Summarize for the client what the team decided and built in the last round.\n"
            f"{outs}\nSummary for the client:{{{{output:summary}}}}",
            "team_lead", self.output_tokens,
        )

    def sizes(self) -> dict[str, Any]:
        return {"roles": [r for r, _ in self.prompts], "rounds": self.rounds,
                "system_prompt_tokens": [self.count(p) for _, p in self.prompts],
                "output_tokens": self.output_tokens, "calls": len(self.prompts) * self.rounds + 1}

    def run(self, runtime: Any) -> ProgramResult:
        roles = [r for r, _ in self.prompts]
        started = time.perf_counter()
        with P.Session(runtime):
            feedback: Any = "none yet, this is the first round"
            outs: list[Any] = []
            for _ in range(self.rounds):
                outs = []
                for i, fn in enumerate(self.functions):
                    kwargs: dict[str, Any] = {"brief": self.brief}
                    if i == 0:
                        kwargs["feedback"] = feedback
                    kwargs |= {f"from_{roles[j]}": outs[j] for j in range(i)}
                    outs.append(fn(**kwargs))  # the baseline's client reads each input here
                feedback = outs[-1]
            summary = self.lead(**dict(zip(roles, outs)))
            final = summary.get(perf="latency")
            latency = time.perf_counter() - started
        return ProgramResult([final], latency)


@dataclass
class SharedPrompt:
    system: str
    questions: list[str]
    output_tokens: int
    count: Counter
    name: str = "shared-prompt"
    unit: str = "apps"

    def __post_init__(self) -> None:
        self.assistant = _fn(self.system + "\nCrew member's question:{{input:question}}\nAnswer:{{output:answer}}",
                             "assistant", self.output_tokens)

    def sizes(self) -> dict[str, Any]:
        return {"users": len(self.questions), "system_prompt_tokens": self.count(self.system),
                "question_tokens": [self.count(q) for q in self.questions], "output_tokens": self.output_tokens,
                "calls": len(self.questions)}

    async def _user(self, runtime: Any, question: str) -> tuple[str, float]:
        started = time.perf_counter()
        async with P.Session(runtime):
            answer = self.assistant(question)
            text = await answer.aget(perf="latency")
        return text, time.perf_counter() - started

    def run(self, runtime: Any) -> ProgramResult:
        async def everyone() -> list[tuple[str, float]]:
            return await asyncio.gather(*(self._user(runtime, q) for q in self.questions))

        started = time.perf_counter()
        results = asyncio.run(everyone())
        latency = time.perf_counter() - started
        return ProgramResult([t for t, _ in results], latency, apps=len(self.questions),
                             app_latencies_s=[s for _, s in results])


@dataclass
class CriticReview:
    """A draft (from a model call, or from a tool the client runs) reviewed by
    a critic whose long instruction head is constant: the head can be
    prefilled while the draft is still being written."""

    head: str
    topic: str
    producer_tokens: int
    output_tokens: int
    count: Counter
    tool_s: float | None = None  # None: a model call writes the draft
    tool_text: str = ""
    name: str = "critic"
    unit: str = "calls"

    def __post_init__(self) -> None:
        if self.tool_s is not None:
            self.name = "tool-critic"
        # Exactly producer_tokens: random weights end early at EOS otherwise.
        sampling = SamplingConfig(max_tokens=self.producer_tokens, temperature=0.0, ignore_eos=True)
        self.writer = P.SemanticFunction("Write a short inspection note about {{input:topic}}.\nNote:{{output:draft}}",
                                         name="writer", defaults=sampling)
        self.critic = _fn(self.head + "\nDraft to review:{{input:draft}}\nCritique:{{output:critique}}",
                          "critic", self.output_tokens)

    def sizes(self) -> dict[str, Any]:
        return {"head_tokens": self.count(self.head), "output_tokens": self.output_tokens,
                "producer": "tool" if self.tool_s is not None else "model",
                "producer_tokens": None if self.tool_s is not None else self.producer_tokens,
                "tool_ms": None if self.tool_s is None else round(self.tool_s * 1000),
                "calls": 1 if self.tool_s is not None else 2}

    def run(self, runtime: Any) -> ProgramResult:
        started = time.perf_counter()
        with P.Session(runtime) as s:
            if self.tool_s is None:
                draft: Any = self.writer(self.topic)
                outputs = [draft]
            elif runtime.request_level:  # the client runs the tool, then sends the call
                time.sleep(self.tool_s)
                draft, outputs = self.tool_text, []
            else:
                draft, outputs = s.variable("draft"), []
            review = self.critic(draft)
            if self.tool_s is not None and not runtime.request_level:
                s.flush()  # the runtime sees the critic waiting for the tool's value
                time.sleep(self.tool_s)  # the tool's work
                draft.set(self.tool_text)
            final = review.get(perf="latency")
            latency = time.perf_counter() - started
            texts = [o.get() for o in outputs]
        return ProgramResult([final, *texts], latency)


_QUESTION_STARTS = ["How do I report", "Who should I call about", "What is the rule for", "Where do I find the log of",
                    "When is the next check of", "Why did the system flag"]


def build_workloads(names: Sequence[str], args: argparse.Namespace, count: Counter) -> list[Any]:
    """The workloads named, at the sizes in ``args``; text seeded by ``args.seed``."""
    out: list[Any] = []
    for name in names:
        rng = random.Random(f"{args.seed}-{name}")
        if name in ("chain", "map-reduce"):
            chunks = [make_text(rng, args.chunk_tokens, count, _report_sentence) for _ in range(args.chunks)]
            cls = ChainSummary if name == "chain" else MapReduceSummary
            out.append(cls(chunks, args.output_tokens, count))
        elif name == "multi-agent":
            roles = _ROLES[: args.roles]
            prompts = [(r, system_prompt(rng, r, intro, args.system_prompt_tokens, count)) for r, intro in roles]
            brief = ("Build a small web service where tram crews log inspections from a phone, see open repairs "
                     "per stop, and get a morning digest of what changed overnight.")
            out.append(MultiAgent(brief, prompts, args.rounds, args.output_tokens, count))
        elif name == "shared-prompt":
            intro = ("You are the help desk assistant of a tram network's maintenance department. You answer crew "
                     "members' questions briefly and point them to the right procedure.")
            system = system_prompt(rng, "assistant", intro, args.system_prompt_tokens, count)
            questions = [f"{_QUESTION_STARTS[i % len(_QUESTION_STARTS)]} the {rng.choice(_PARTS)} at "
                         f"{rng.choice(_PLACES)} (ticket {1000 + i})?" for i in range(args.users)]
            out.append(SharedPrompt(system, questions, args.output_tokens, count))
        elif name in EARLY_WORKLOADS:
            intro = ("You are the reviewing engineer of a tram network's maintenance department. You read a draft "
                     "inspection note and list what is wrong, missing or unclear in it, most serious first.")
            head = system_prompt(rng, "critic", intro, args.head_tokens, count)
            tool_s = args.tool_ms / 1000 if name == "tool-critic" else None
            tool_text = make_text(rng, args.producer_tokens, count, _report_sentence)
            out.append(CriticReview(head, rng.choice(_PARTS), args.producer_tokens, args.output_tokens, count,
                                    tool_s=tool_s, tool_text=tool_text))
        else:
            raise ValueError(f"unknown workload {name!r}")
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.app_workloads",
        description="Parrot vs the request-level baseline on the paper's four application shapes "
        "(same engines, alternating runs, medians and ratios).",
    )
    parser.add_argument("--workload", choices=(*WORKLOADS, *EARLY_WORKLOADS, "all"), default="all",
                        help="all: the four paper shapes (default)")
    parser.add_argument("--compare", choices=tuple(COMPARISONS), default="baseline",
                        help="baseline: Parrot vs the request-level baseline (default); early-prefill: Parrot with "
                             "early prefill of waiting calls' heads on vs off")
    s = parser.add_argument_group("sizes (defaults finish in a few minutes on a 2-core CPU with the tiny model)")
    s.add_argument("--chunks", type=int, default=6, help="document chunks for chain and map-reduce (default 6)")
    s.add_argument("--chunk-tokens", type=int, default=384, help="tokens per chunk (default 384)")
    s.add_argument("--users", type=int, default=16, help="concurrent users for shared-prompt (default 16)")
    s.add_argument("--rounds", type=int, default=3, help="rounds of the multi-agent team (default 3)")
    s.add_argument("--roles", type=int, default=4, choices=range(2, len(_ROLES) + 1), metavar=f"2..{len(_ROLES)}",
                   help="roles in the multi-agent team (default 4)")
    s.add_argument("--output-tokens", type=int, default=24, help="max_tokens of every output (default 24)")
    s.add_argument("--system-prompt-tokens", type=int, default=768,
                   help="length of each long system prompt, multi-agent and shared-prompt (default 768)")
    s.add_argument("--head-tokens", type=int, default=1536,
                   help="constant instruction head of the critic, critic and tool-critic (default 1536)")
    s.add_argument("--producer-tokens", type=int, default=64,
                   help="tokens the critic's producer writes (the tool's text for tool-critic; default 64)")
    s.add_argument("--tool-ms", type=float, default=500.0, help="how long tool-critic's tool runs (default 500)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generated texts (default 0)")
    add_engine_args(parser)
    args = parser.parse_args(argv)
    for name in ("chunks", "chunk_tokens", "users", "rounds", "output_tokens", "repeats", "engines",
                 "head_tokens", "producer_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tool_ms < 0:
        parser.error("--tool-ms must be >= 0")
    if args.system_prompt_tokens < 32:
        parser.error("--system-prompt-tokens must be >= 32")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    model_path, weights = resolve_model(args)
    engines = build_engines(model_path, device=args.device, count=args.engines,
                            max_running=args.max_running, max_step_tokens=args.max_step_tokens)
    try:
        tokenizer = engines[0].tokenizer
        count: Counter = lambda text: len(tokenizer.encode(text))  # noqa: E731
        results = []
        for workload in build_workloads(names, args, count):
            progress(f"{workload.name}: {workload.sizes()['calls']} calls per run")
            results.append(measure(workload, engines, repeats=args.repeats, warmup=not args.no_warmup,
                                   keep_prefix_cache=args.keep_prefix_cache, modes=COMPARISONS[args.compare]))
        context = describe_context(engines, model_path=model_path, weights=weights,
                                   extra={"argv": list(sys.argv[1:] if argv is None else argv)})
    finally:
        close_engines(engines)
    title = "Parrot vs request-level baseline" if args.compare == "baseline" else "Early prefill on vs off (Parrot)"
    print(f"{title} on {context['device_name']} ({context['device']}, {context['dtype']}), "
          f"{context['parameters'] / 1e6:.1f} M parameters, {weights}; medians of {args.repeats} alternating runs")
    print(format_table(results))
    payload = {"benchmark": "app_workloads", "context": context, "results": results}
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
