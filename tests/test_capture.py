"""The fidelity matrix: real LlamaIndex pipelines recorded through both channels, read back from Aim.

Each test instruments in-process (thread writer), runs one scenario with MockLLM / MockEmbedding
or a small offline fake from `apps/fakellm.py`, uninstruments (which finalizes its run) and reads
that run back the way Aim's UI does. The tests share one repo (creating an Aim repo costs
seconds), each reading only its own run by hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import APPS, clean_env

sys.path.insert(0, str(APPS))

from fakellm import USAGE, FailingLLM, RuleLLM, ScriptedToolLLM, SlowLLM, WordEmbedding
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.workflow import Context

import aim_llama
from aimread import RunData, read_run

QUESTIONS = [f"question {i}: what about topic {i % 3}?" for i in range(5)]
RETRIEVE = {"kind": "retrieve", "retriever": "VectorIndexRetriever"}  # a vector index's retrievals


@pytest.fixture(autouse=True)
def _mock_models() -> Iterator[None]:
    Settings.llm = MockLLM(max_tokens=8)
    Settings.embed_model = MockEmbedding(embed_dim=8)
    yield
    aim_llama.uninstrument()


def _index() -> VectorStoreIndex:
    docs = [Document(text=f"Document number {i} talks about topic {i % 3}.") for i in range(6)]
    return VectorStoreIndex.from_documents(docs)


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("capture") / "aimrepo"


@pytest.fixture
def repo(shared_repo: Path) -> Iterator[Path]:
    """The shared repo; `only_run(repo)` then reads the run this test recorded."""
    _runs.clear()
    yield shared_repo


_runs: list[str] = []


def only_run(repo: Path) -> RunData:
    assert len(_runs) == 1, _runs
    return read_run(repo, _runs[0])


@contextmanager
def recording(repo: Path, **overrides: Any) -> Iterator[None]:
    """Instrument into `repo` with an in-process writer; uninstrument (finalize) on exit."""
    assert aim_llama.instrument(
        repo=str(repo), writer="thread", system_tracking_interval=None, log_system_params=False,
        capture_terminal_logs=False, **overrides,
    )
    try:
        yield
    finally:
        from aim_llama.autoinstrument import _active

        writer = _active.writer if _active is not None else None
        aim_llama.uninstrument()
        if writer is not None and writer.run_hash:
            _runs.append(writer.run_hash)


def steps(run: RunData, name: str, kind: str = "llm", **ctx: Any) -> list[int]:
    seq = run.text(name, kind=kind, **ctx) or run.metric(name, kind=kind, **ctx)
    return [s for s, _ in seq]


def traces(run: RunData, kind: str) -> list[str]:
    return [t for _, t in run.text("trace", kind=kind)]


def assert_llm_steps_line_up(run: RunData, n: int, source: str = "estimated") -> None:
    expected = list(range(n))
    assert steps(run, "prompt") == expected
    assert steps(run, "response") == expected
    assert steps(run, "latency_ms") == expected
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert steps(run, name, source=source) == expected, name
    if source == "estimated":  # the writer's count is exactly LlamaIndex's default tokenizer's
        from llama_index.core import Settings

        prompts = dict(run.text("prompt", kind="llm"))
        responses = dict(run.text("response", kind="llm"))
        completion = dict(run.metric("completion_tokens", kind="llm", source="estimated"))
        total = dict(run.metric("total_tokens", kind="llm", source="estimated"))
        checked = 0
        for step, value in run.metric("prompt_tokens", kind="llm", source="estimated"):
            texts = (prompts[step], responses[step])
            if any("[REDACTED]" in t or "[truncated" in t for t in texts):
                continue
            assert value == len(Settings.tokenizer(prompts[step])), step
            said = re.sub(r"(?:^|\n)\[(stream abandoned|cancelled|error: \w+)\]$", "",
                          responses[step])  # (its status mark)
            assert completion[step] == len(Settings.tokenizer(said)), step
            assert total[step] == value + completion[step], step
            checked += 1
        assert checked, "no step whose texts were stored whole"


# -- index, query, streaming ------------------------------------------------------------
def test_index_build_records_embeddings_and_chunks(repo: Path) -> None:
    with recording(repo):
        _index()
    run = only_run(repo)
    assert [v for _, v in run.metric("embedded_texts", kind="embedding")] == [6.0]
    assert run.metric("embedding_tokens", kind="embedding", source="estimated")[0][1] > 6
    assert len(run.text("chunk", kind="chunking")) == 6
    assert not run.text("prompt", kind="llm")
    assert not [k for k in run.texts if k[0] == "trace"]  # building an index is not a request


def test_a_synthesizer_outside_a_request_adds_no_chunks(repo: Path) -> None:
    """A response synthesizer re-splits text for its prompts; inside a query that was already
    left out of `chunk`, but not elsewhere: a `DocumentSummaryIndex` build (its summaries)
    recorded each document twice, and a synthesizer called directly its node's text."""
    from llama_index.core import DocumentSummaryIndex, get_response_synthesizer
    from llama_index.core.schema import NodeWithScore, TextNode

    docs = [Document(text=f"Document number {i} talks about topic {i % 3}.") for i in range(3)]
    with recording(repo):
        DocumentSummaryIndex.from_documents(docs, llm=MockLLM(max_tokens=4),
                                            embed_model=MockEmbedding(embed_dim=8))
        get_response_synthesizer(response_mode="compact", llm=MockLLM(max_tokens=4)).synthesize(
            "q?", [NodeWithScore(node=TextNode(text="a retrieved node's text"), score=1.0)])
    run = only_run(repo)
    assert [t for _, t in run.text("chunk", kind="chunking")] == [d.text for d in docs]
    assert len(run.text("prompt", kind="llm")) == 4  # 3 summaries + the direct synthesis


def test_async_index_build_records_every_embedding_batch(repo: Path) -> None:
    # An async batch embedding sends every batch's start event before the first end, all in
    # one span: each end must still find its own start.
    docs = [Document(text=f"Document number {i}.") for i in range(25)]
    with recording(repo):
        VectorStoreIndex.from_documents(docs, use_async=True)
    run = only_run(repo)
    assert sorted(v for _, v in run.metric("embedded_texts", kind="embedding")) == [5.0, 10.0, 10.0]
    assert len(run.metric("latency_ms", kind="embedding")) == 3
    assert len(run.metric("embedding_tokens", kind="embedding", source="estimated")) == 3


def test_query_sync_exactly_once_steps_and_trace(repo: Path) -> None:
    index = _index()
    engine = index.as_query_engine(similarity_top_k=2)
    with recording(repo):
        for q in QUESTIONS[:3]:
            engine.query(q)
    run = only_run(repo)
    assert_llm_steps_line_up(run, 3)
    prompts = [t for _, t in run.text("prompt", kind="llm")]
    assert all(q in p for q, p in zip(QUESTIONS, prompts, strict=False))
    assert [t for _, t in run.text("question", kind="query")] == QUESTIONS[:3]
    assert len(run.text("answer", kind="query")) == 3
    query_latency = [v for _, v in run.metric("latency_ms", kind="query")]
    llm_latency = [v for _, v in run.metric("latency_ms", kind="llm")]
    assert len(query_latency) == 3
    # each request's latency spans its LLM call (sequential queries: step i is query i's call)
    assert all(q > m > 0 for q, m in zip(query_latency, llm_latency, strict=True))
    assert [v for _, v in run.metric("retrieved_nodes", **RETRIEVE)] == [2.0] * 3
    # each retrieval's two scores, as Aim's distributions view shows them, around its top score
    scores = run.distribution("retrieval_scores", **RETRIEVE)
    assert [(step, count) for step, (count, _) in scores] == [(0, 2), (1, 2), (2, 2)]
    for (_, (_, (low, high))), (_, top) in zip(scores, run.metric("top_score", **RETRIEVE),
                                               strict=True):
        assert low <= top <= high + 1e-9
    retrieved = run.text("retrieved", **RETRIEVE)
    assert retrieved[0][1].startswith(f"query: {QUESTIONS[0]}\n1. ")
    tr = traces(run, "query")
    assert len(tr) == 3
    for q, t in zip(QUESTIONS, tr, strict=False):
        assert t.splitlines()[0] == f"query: {q}"
        assert "VectorIndexRetriever.retrieve" in t and "MockLLM" in t and "tokens=" in t
    # contexts are bounded: the same handful of sequences however many calls
    assert all(set(dict(ctx)) <= {"kind", "source", "tool", "step", "retriever"}
               for _, ctx in run.sequences())
    # the synthesizer re-splits retrieved text inside each query (CHUNKING callback events):
    # already in the prompt, so not recorded as `chunk` texts (index builds are)
    assert not run.text("chunk", kind="chunking")


def test_query_async_counts_each_llm_call_once(repo: Path) -> None:
    engine = _index().as_query_engine(similarity_top_k=2)

    async def main() -> None:
        for q in QUESTIONS[:2]:
            await engine.aquery(q)

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    # MockLLM.acomplete calls complete: two LLM events per call on both channels, one record.
    assert_llm_steps_line_up(run, 2)
    assert len(traces(run, "query")) == 2


def test_streaming_query_recorded_when_stream_finishes(repo: Path) -> None:
    # RuleLLM streams cumulative text (MockLLM's last chunk lags its deltas by one word)
    llm = RuleLLM(first_delay=0.15, chunk_delay=0.3)  # 6 words: 0.15 s to the first, 1.65 s in all
    engine = _index().as_query_engine(similarity_top_k=2, streaming=True, llm=llm)
    with recording(repo):
        response = engine.query(QUESTIONS[0])
        consumed = "".join(response.response_gen)
    assert consumed  # the user's stream is intact
    run = only_run(repo)
    assert_llm_steps_line_up(run, 1)
    assert run.text("response", kind="llm")[0][1] == consumed
    ((_, ttft),) = run.metric("ttft_ms", kind="llm")
    ((_, llm_latency),) = run.metric("latency_ms", kind="llm")
    ((_, query_latency),) = run.metric("latency_ms", kind="query")
    assert 150 <= ttft < 1000 < 1640 <= llm_latency <= query_latency < 30_000
    assert [t for _, t in run.text("answer", kind="query")] == [consumed]
    (trace,) = traces(run, "query")
    assert trace.splitlines()[0] == f"query: {QUESTIONS[0]}"
    assert "stream llm" in trace  # the deferred LLM stream joined its query's trace


def _counting_stream_llm() -> Any:
    """A CustomLLM that counts its calls; streams say `streamed answer <n>` (async: `astreamed`)."""
    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback

    class Counting(CustomLLM):
        calls: int = 0

        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(model_name="counting", context_window=700, num_output=20)

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            self.calls += 1
            return CompletionResponse(text=f"answer {self.calls}")

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            self.calls += 1
            n = self.calls

            def gen() -> Any:
                text = ""
                for word in ("streamed", "answer", str(n)):
                    text += word + " "
                    yield CompletionResponse(text=text, delta=word + " ")
            return gen()

        @llm_completion_callback()
        async def astream_complete(self, prompt: str, formatted: bool = False,
                                   **kwargs: Any) -> Any:
            self.calls += 1
            n = self.calls

            async def gen() -> Any:
                text = ""
                for word in ("astreamed", "answer", str(n)):
                    text += word + " "
                    yield CompletionResponse(text=text, delta=word + " ")
            return gen()

    return Counting()


def test_a_streaming_query_of_several_llm_calls_waits_for_its_last(repo: Path) -> None:
    """A streaming query whose synthesizer makes several LLM calls (compact mode over more text
    than one prompt holds; refine always): LlamaIndex reads the intermediate streams itself,
    and the last one runs only as the application reads `response_gen`. The request took the
    second-to-last call's text for its answer, ended before the app read anything, and its
    last call was recorded outside it; now it waits for the stream the app reads."""
    from llama_index.core import SummaryIndex

    llm = _counting_stream_llm()
    docs = [Document(text=f"Doc {i} sentence about things and stuff. " * 12) for i in range(6)]
    read: list[str] = []
    with recording(repo):
        index = SummaryIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))
        engine = index.as_query_engine(streaming=True, llm=llm)
        before = llm.calls
        response = engine.query("sync?")
        time.sleep(0.3)  # (the request is not over until the app has read its stream)
        read.append("".join(response.response_gen))
        made = llm.calls - before

        async def read_async() -> str:
            response = await index.as_query_engine(streaming=True, llm=llm).aquery("async?")
            await asyncio.sleep(0.3)
            return "".join([t async for t in response.async_response_gen()])

        read.append(asyncio.run(read_async()))
    assert made >= 3  # several calls, or this test tests nothing
    run = only_run(repo)
    assert [a for _, a in run.text("answer", kind="query")] == read
    assert all(v >= 300 for _, v in run.metric("latency_ms", kind="query"))
    for trace in traces(run, "query"):
        assert f"llm calls {made}" in trace.splitlines()[1], trace
    assert len(run.text("response", kind="llm")) == llm.calls


def test_a_streaming_chat_of_several_llm_calls_waits_for_llamaindexs_thread(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A context chat engine's `stream_chat` over more text than one prompt holds: LlamaIndex
    reads the intermediate streams itself and the last one in a thread of its own, which may
    start after `stream_chat` returned (a busy machine; forced here). The request waits for
    that thread (it took the second-to-last call's text, and the last call was a request of
    its own)."""
    import llama_index.core.chat_engine.context as context
    from llama_index.core import SummaryIndex
    from llama_index.core.chat_engine import ContextChatEngine

    class LateThread(context.Thread):
        def run(self) -> None:
            time.sleep(0.05)
            super().run()

    monkeypatch.setattr(context, "Thread", LateThread)
    llm = _counting_stream_llm()
    docs = [Document(text=f"Doc {i} sentence about things and stuff. " * 12) for i in range(6)]
    with recording(repo):
        index = SummaryIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))
        engine = ContextChatEngine.from_defaults(retriever=index.as_retriever(), llm=llm)
        response = engine.stream_chat("hello?")
        time.sleep(0.3)
        read = "".join(response.response_gen)
    assert llm.calls >= 3  # several calls, or this test tests nothing
    run = only_run(repo)
    assert [a for _, a in run.text("answer", kind="chat")] == [read]
    (trace,) = traces(run, "chat")
    assert f"llm calls {llm.calls}" in trace.splitlines()[1], trace


def test_a_held_chat_stream_whose_history_task_never_runs_still_ends(repo: Path) -> None:
    """The hold above has an end however LlamaIndex's writer ends: `astream_chat`'s history
    task cancelled before its first step (no span, no event, no LLM call) still ends the
    request, as abandoned, at the next span, instead of staying open for 30 minutes."""
    from llama_index.core import SummaryIndex
    from llama_index.core.chat_engine import ContextChatEngine

    llm = _counting_stream_llm()
    docs = [Document(text=f"Doc {i} sentence about things and stuff. " * 12) for i in range(6)]
    with recording(repo):
        index = SummaryIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))
        engine = ContextChatEngine.from_defaults(retriever=index.as_retriever(), llm=llm)

        async def cancelled() -> None:
            response = await engine.astream_chat("hello?")
            response.awrite_response_to_history_task.cancel()
            await asyncio.sleep(0.1)

        asyncio.run(cancelled())
        assert llm.calls >= 3
        MockLLM(max_tokens=2).complete("the next span")
        from aim_llama.autoinstrument import _active

        assert _active is not None and _active.handler.observer.open_state()["roots"] == 0
    run = only_run(repo)
    (trace,) = traces(run, "chat")
    assert " abandoned " in trace.splitlines()[1], trace


def test_a_stream_whose_last_chunk_lags_is_recorded_as_the_app_read_it(repo: Path) -> None:
    """MockLLM's last chunk carries the text before its own delta: the stored response and
    answer are what the application read, not one chunk short."""
    from llama_index.core.llms import ChatMessage

    llm = MockLLM(max_tokens=6)
    engine = _index().as_query_engine(similarity_top_k=2, streaming=True, llm=llm)
    with recording(repo):
        consumed = "".join(engine.query(QUESTIONS[0]).response_gen)
        chatted = "".join(r.delta or "" for r in llm.stream_chat(
            [ChatMessage(role="user", content="hello")]))
    assert consumed.split() == ["text"] * 6 and chatted.split() == ["text"] * 6
    run = only_run(repo)
    assert [t for _, t in run.text("response", kind="llm")] == [consumed.strip(),
                                                                 chatted.strip()]
    assert [t for _, t in run.text("answer", kind="query")] == [consumed]


def test_a_streaming_query_that_needs_no_llm_ends_when_its_stream_does(repo: Path) -> None:
    """Nothing retrieved: LlamaIndex streams "Empty Response" without an LLM call; the request
    ends when that stream is read, not at shutdown."""
    from llama_index.core.postprocessor import SimilarityPostprocessor

    llm = RuleLLM()
    engine = _index().as_query_engine(streaming=True, llm=llm, node_postprocessors=[
        SimilarityPostprocessor(similarity_cutoff=2.0)])
    with recording(repo):
        consumed = "".join(engine.query("nothing matches").response_gen)
        aim_llama.flush(30)
        from aim_llama.autoinstrument import _active
        assert _active is not None and _active.handler.observer.open_state()["roots"] == 0
    assert consumed == "Empty Response" and llm.calls == 0
    run = only_run(repo)
    assert [t for _, t in run.text("answer", kind="query")] == ["Empty Response"]
    (trace,) = traces(run, "query")
    assert " · ok · llm calls 0 " in trace.splitlines()[1]


def test_streaming_queries_read_later_or_elsewhere_join_their_own_requests(repo: Path) -> None:
    # A streaming query's LLM call happens when its response is first read: here after a
    # second query returned its stream, and in another thread than the query ran in (a web
    # server's worker thread runs the query, the response is streamed from elsewhere).
    from concurrent.futures import ThreadPoolExecutor

    engine = _index().as_query_engine(similarity_top_k=2, streaming=True, llm=RuleLLM())
    with recording(repo):
        first = engine.query(QUESTIONS[0])
        second = engine.query(QUESTIONS[1])
        answers = ["".join(first.response_gen), "".join(second.response_gen)]
        with ThreadPoolExecutor(1) as pool:
            third = pool.submit(engine.query, QUESTIONS[2]).result()
        answers.append("".join(third.response_gen))
    run = only_run(repo)
    assert_llm_steps_line_up(run, 3)
    prompts = [t for _, t in run.text("prompt", kind="llm")]
    assert all(q in p for q, p in zip(QUESTIONS, prompts, strict=False))
    assert [t for _, t in run.text("question", kind="query")] == QUESTIONS[:3]
    assert [t for _, t in run.text("answer", kind="query")] == answers
    for q, trace in zip(QUESTIONS[:3], traces(run, "query"), strict=True):
        head, summary = trace.splitlines()[:2]
        assert head == f"query: {q}"
        assert " ok " in summary and "llm calls 1" in summary, trace
        assert "stream llm" in trace


def test_async_streaming_query_counts_its_llm_call_once(repo: Path) -> None:
    # CustomLLM.astream_complete returns a generator that calls stream_complete when it is
    # consumed, after the query's span ended and outside any span: still the same one call.
    engine = _index().as_query_engine(similarity_top_k=2, streaming=True, llm=RuleLLM())

    async def main() -> str:
        response = await engine.aquery(QUESTIONS[0])
        return "".join([token async for token in response.async_response_gen()])

    with recording(repo):
        consumed = asyncio.run(main())
    run = only_run(repo)
    assert_llm_steps_line_up(run, 1)
    assert run.text("response", kind="llm")[0][1] == consumed
    (trace,) = traces(run, "query")
    assert "llm calls 1" in trace.splitlines()[1]


def test_async_streams_read_in_another_task_or_later_join_their_own_requests(
        repo: Path) -> None:
    """`aquery` streams read where a web framework reads them: in a task of its own, or after
    a second request opened its stream. Each LLM call joins its own request."""
    engine = _index().as_query_engine(similarity_top_k=2, streaming=True, llm=MockLLM())
    # (MockLLM with no max_tokens echoes its prompt: an answer names its question)

    async def read(response: Any) -> str:
        return "".join([t async for t in response.async_response_gen()])

    async def main() -> list[str]:
        first = await asyncio.create_task(engine.aquery(QUESTIONS[0]))
        got = [await asyncio.create_task(read(first))]
        second, third = await engine.aquery(QUESTIONS[1]), await engine.aquery(QUESTIONS[2])
        got += [await read(second), await read(third)]
        return got

    with recording(repo):
        consumed = asyncio.run(main())
    run = only_run(repo)
    questions = dict(run.text("question", kind="query"))
    answers = dict(run.text("answer", kind="query"))
    assert [questions[i] for i in range(3)] == QUESTIONS[:3]
    assert [answers[i] for i in range(3)] == consumed
    for i in range(3):
        assert QUESTIONS[i] in answers[i]
    assert len(traces(run, "query")) == 3
    for trace in traces(run, "query"):
        assert "llm calls 1 " in trace
    assert_llm_steps_line_up(run, 3)


def test_async_streams_closed_after_one_chunk_leave_nothing_behind(repo: Path) -> None:
    engine = _index().as_query_engine(similarity_top_k=2, streaming=True, llm=MockLLM())

    async def partial(question: str) -> None:
        response = await engine.aquery(question)
        stream = response.async_response_gen()
        await stream.__anext__()
        await stream.aclose()  # the client stopped reading

    with recording(repo):
        from aim_llama.autoinstrument import _active

        observer = _active.handler.observer  # type: ignore[union-attr]

        async def main() -> dict[str, int]:
            for q in QUESTIONS:
                await partial(q)
            await asyncio.sleep(0.2)
            gc.collect()
            return observer.open_state()  # while the service goes on running

        assert asyncio.run(main()) == {"spans": 0, "roots": 0, "calls": 0, "timed": 0}
    run = only_run(repo)  # (each ends when its stream is closed, in the event loop's order)
    assert sorted(q for _, q in run.text("question", kind="query")) == sorted(QUESTIONS)
    assert len(traces(run, "query")) == len(QUESTIONS)
    assert all("llm calls 1 " in t for t in traces(run, "query"))


def test_a_request_open_at_shutdown_has_a_trace_but_no_latency(repo: Path) -> None:
    engine = _index().as_query_engine(similarity_top_k=2, streaming=True)
    with recording(repo):
        kept = engine.query(QUESTIONS[0])  # its stream is never read (nor dropped)
        engine.query(QUESTIONS[1]).get_response()
        time.sleep(1.0)
    del kept
    run = only_run(repo)
    # steps count requests as they end: the finished one first, the open one at shutdown
    assert dict(run.text("question", kind="query")) == {0: QUESTIONS[1], 1: QUESTIONS[0]}
    tr = dict(run.text("trace", kind="query"))
    assert "· ok ·" in tr[0] and "incomplete at shutdown" in tr[1]
    # nothing ran under it until shutdown: timed to its last activity, not to the shutdown
    assert float(tr[1].splitlines()[1].split(" ms")[0]) < 1000, tr[1]
    assert [s for s, _ in run.metric("latency_ms", kind="query")] == [0]


def test_a_request_cut_off_by_shutdown_shows_how_long_it_had_run(repo: Path) -> None:
    """Its trace said `123.2 ms · incomplete at shutdown` with its spans `open ok` for a
    request that had been waiting seconds on a slow call: the header now runs until shutdown
    and spans still open say `running` with their time so far."""
    import contextvars
    import threading
    import time as _time

    engine = _index().as_query_engine(llm=SlowLLM(delay=2.0))
    with recording(repo):
        worker = threading.Thread(target=contextvars.copy_context().run,
                                  args=(asyncio.run, engine.aquery(QUESTIONS[0])))
        worker.start()
        _time.sleep(0.6)
    worker.join()
    (trace,) = traces(only_run(repo), "query")
    header = trace.splitlines()[1]
    # (timed to the shutdown, ~0.6 s after the thread started, not to its last finished span,
    # ~15 ms; the request itself starts a little after its thread)
    assert "incomplete at shutdown" in header and float(header.split(" ms")[0]) >= 450, trace
    assert re.search(r"RetrieverQueryEngine\.aquery \d+\.\dms running", trace), trace
    assert " open " not in trace, trace


def test_streams_dropped_unread_end_their_call_and_request_as_abandoned(repo: Path) -> None:
    """A stream the application drops without reading it (a client gone before the first
    chunk) never sends an end event: its LLM call and request ended only at expiry, 30 minutes
    later, each one making later requests slower. They end at the next span now, abandoned."""
    from llama_index.core.instrumentation import get_dispatcher

    from aim_llama.dispatcher import AimSpanHandler

    engine = _index().as_query_engine(similarity_top_k=2, streaming=True)
    llm = MockLLM(max_tokens=4)
    with recording(repo):
        (obs,) = [h.obs for h in get_dispatcher().span_handlers if isinstance(h, AimSpanHandler)]
        for i in range(30):
            llm.stream_complete(f"dropped {i}")  # never read
            engine.query(QUESTIONS[i % 5])  # its StreamingResponse, never read
        engine.query(QUESTIONS[0]).get_response()  # read: the next span ends the last ones
        state = obs.open_state()
    assert state["calls"] == 0 and state["roots"] == 0, state
    run = only_run(repo)
    traces = [t for _, t in run.text("trace", kind="query")]
    assert len(traces) == 31 and sum("· abandoned ·" in t for t in traces) == 30, traces[:2]
    responses = [t for _, t in run.text("response", kind="llm")]
    assert sum(t.endswith("[stream abandoned]") for t in responses) == 30
    assert len(run.text("answer", kind="query")) == 1


def test_a_dropped_stream_is_timed_to_when_the_app_let_go_of_it(repo: Path) -> None:
    """Not to the next span, which in a quiet service may come hours later: that idle time
    was the `latency_ms` of the LLM call and of the request."""
    engine = _index().as_query_engine(similarity_top_k=2, streaming=True)
    llm = MockLLM(max_tokens=4)
    with recording(repo):
        llm.stream_complete("dropped")  # never read
        time.sleep(1.0)
        engine.query(QUESTIONS[0])  # its StreamingResponse, never read
        time.sleep(1.0)
        engine.query(QUESTIONS[1]).get_response()  # the next span ends the dropped ones
    run = only_run(repo)
    (abandoned,) = [s for s, t in run.text("response", kind="llm")
                    if t.endswith("[stream abandoned]")]
    assert dict(run.metric("latency_ms", kind="llm"))[abandoned] < 500
    (first, _) = [v for _, v in run.metric("latency_ms", kind="query")]
    assert first < 500, first
    (trace, _) = traces(run, "query")
    assert "· abandoned ·" in trace
    assert float(trace.splitlines()[1].split(" ms")[0]) < 500, trace


def test_a_stream_dropped_longer_ago_than_the_request_ttl_was_abandoned_not_expired(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next span after a quiet spell ends what was dropped (at its drop) before it expires
    what was kept: the LLM call was lost, the request said `expired`, with no latency."""
    from aim_llama import observer as observer_module

    engine = _index().as_query_engine(similarity_top_k=2, streaming=True)
    llm = MockLLM(max_tokens=4)
    with recording(repo):
        from aim_llama.autoinstrument import _active

        observer = _active.handler.observer  # type: ignore[union-attr]
        monkeypatch.setattr(observer_module, "ROOT_TTL", 0.5)
        monkeypatch.setattr(observer_module, "SWEEP_INTERVAL", 0.0)
        response = engine.query(QUESTIONS[0])
        stream = llm.stream_complete("dropped")
        del response, stream  # both dropped unread, no span since
        time.sleep(1.0)
        observer._next_sweep = 0.0  # (the next span sweeps)
        engine.query(QUESTIONS[1]).get_response()
    run = only_run(repo)
    responses = [t for _, t in run.text("response", kind="llm")]
    assert responses[0] == "[stream abandoned]", responses
    assert len(run.metric("latency_ms", kind="llm")) == 2
    first = traces(run, "query")[0]
    assert first.startswith(f"query: {QUESTIONS[0]}\n") and "· abandoned ·" in first, first
    assert [v < 500 for _, v in run.metric("latency_ms", kind="query")] == [True, True]


def test_a_stream_kept_idle_past_the_request_ttl_then_dropped_has_expired(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its request was idle for the TTL while the app still held the stream: it expired then
    (no latency), whenever the drop is noticed — not `abandoned` after the whole hold."""
    from aim_llama import observer as observer_module

    engine = _index().as_query_engine(similarity_top_k=2, streaming=True)
    llm = MockLLM(max_tokens=4)
    with recording(repo):
        monkeypatch.setattr(observer_module, "ROOT_TTL", 0.5)
        response = engine.query(QUESTIONS[0])
        stream = llm.stream_complete("held")
        time.sleep(1.0)  # no span meanwhile: nothing swept
        del response, stream
        engine.query(QUESTIONS[1]).get_response()
    run = only_run(repo)
    first, second = traces(run, "query")
    assert first.startswith(f"query: {QUESTIONS[0]}\n") and "· expired (incomplete) ·" in first
    assert "· ok ·" in second
    assert len(run.metric("latency_ms", kind="query")) == 1  # the second query's
    assert all(v < 500 for _, v in run.metric("latency_ms", kind="llm"))


def test_a_workflow_step_that_drops_a_stream_after_a_long_wait_keeps_its_run(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run still going never expires (it may wait for a human): a stream one of its steps
    held through a wait longer than the TTL and then dropped does not end the run."""
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    from aim_llama import observer as observer_module

    class Holder(Workflow):
        @step
        async def hold(self, ev: StartEvent) -> StopEvent:
            stream = Settings.llm.stream_complete("held")
            await asyncio.sleep(1.0)
            del stream
            Settings.llm.complete("after the wait")
            return StopEvent(result="done")

    with recording(repo):
        monkeypatch.setattr(observer_module, "ROOT_TTL", 0.5)
        asyncio.run(_run(Holder(), topic="t"))
    run = only_run(repo)
    (trace,) = traces(run, "workflow")
    assert "· ok ·" in trace.splitlines()[1] and "expired" not in trace, trace
    assert [t for _, t in run.text("answer", kind="workflow")] == ["done"]
    responses = [t for _, t in run.text("response", kind="llm")]
    assert responses[0] == "[stream abandoned]" and len(responses) == 2, responses


def test_a_request_ends_no_earlier_than_its_own_streams(repo: Path) -> None:
    """A request with two streams, one dropped unread and one read to its end a second later,
    ends with the second (it was timed to the drop, before its own LLM call ended)."""
    from llama_index.core.query_engine import CustomQueryEngine

    streams: list[Any] = []

    class TwoStreams(CustomQueryEngine):
        def custom_query(self, query_str: str) -> str:
            streams.append(Settings.llm.stream_complete("A " + query_str))
            streams.append(Settings.llm.stream_complete("B " + query_str))
            return "done"

    with recording(repo):
        TwoStreams().query("two")
        read = streams.pop()
        streams.clear()  # the first dropped unread
        for _ in range(8):  # every chunk of the second (MockLLM(max_tokens=8))
            next(read)
        time.sleep(0.6)  # then the app pauses before the stream's end
        assert list(read) == []
        Settings.llm.complete("the next span")
    run = only_run(repo)
    (request,) = [v for _, v in run.metric("latency_ms", kind="query")]
    read_call = max(v for _, v in run.metric("latency_ms", kind="llm"))
    assert read_call >= 600 and request >= read_call, (request, read_call)


def test_llm_calls_in_flight_at_shutdown_keep_their_prompt_and_what_was_read(repo: Path) -> None:
    """A stream the app was still reading when it shut down: the LLM call's prompt and the text
    read so far are recorded (marked), without a latency or token counts it never had; before,
    the call vanished and its request's trace said `llm calls 0`."""
    engine = _index().as_query_engine(streaming=True, llm=RuleLLM())
    llm = RuleLLM()
    with recording(repo):
        in_query = engine.query(QUESTIONS[0]).response_gen
        next(in_query), next(in_query)
        bare = llm.stream_complete("a bare call")
        next(bare)
        "".join(r.delta or "" for r in llm.stream_complete("a finished call"))
    run = only_run(repo)
    prompts = dict(run.text("prompt", kind="llm"))
    responses = dict(run.text("response", kind="llm"))
    assert sorted(prompts) == sorted(responses) and len(prompts) == 3, prompts
    by_prompt = {prompts[s].splitlines()[0] if "a bare" not in prompts[s] and "a finished"
                 not in prompts[s] else prompts[s]: responses[s] for s in prompts}
    assert by_prompt["a bare call"] == "an\n[incomplete at shutdown]"
    assert by_prompt["a finished call"] == "an answer from the rule llm"
    (queried,) = [r for p, r in by_prompt.items() if p not in ("a bare call", "a finished call")]
    assert queried == "an answer\n[incomplete at shutdown]"
    finished = next(s for s, p in prompts.items() if p == "a finished call")
    assert [s for s, _ in run.metric("latency_ms", kind="llm")] == [finished]
    assert [s for s, _ in run.metric("total_tokens", kind="llm", source="estimated")] == [finished]
    (trace,) = traces(run, "query")
    assert "incomplete at shutdown" in trace.splitlines()[1] and "llm calls 1" in trace, trace
    assert "llm incomplete" in trace, trace


def test_two_streams_opened_before_either_is_read_are_two_calls(repo: Path) -> None:
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    llm = RuleLLM()

    class FanOut(Workflow):
        @step
        async def go(self, ev: StartEvent) -> StopEvent:
            first = llm.stream_complete("first prompt")
            second = llm.stream_complete("second prompt")
            a = "".join(r.delta or "" for r in first)
            b = "".join(r.delta or "" for r in second)
            return StopEvent(result=a + "|" + b)

    async def streamed(prompt: str) -> str:
        return "".join([r.delta or "" async for r in await llm.astream_complete(prompt)])

    async def interleaved() -> None:  # another call of the same LLM while one is unread
        pending = await llm.astream_complete("async, read last")
        "".join(r.delta or "" for r in llm.stream_complete("sync, meanwhile"))
        "".join([r.delta or "" async for r in pending])

    async def main() -> None:
        await FanOut().run()
        await asyncio.gather(*(streamed(f"async prompt {i}") for i in range(3)))
        await interleaved()

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    assert_llm_steps_line_up(run, 7)
    prompts = sorted(t for _, t in run.text("prompt", kind="llm"))
    assert prompts == sorted(["first prompt", "second prompt", "async, read last",
                              "sync, meanwhile"] + [f"async prompt {i}" for i in range(3)])
    (trace,) = traces(run, "workflow")
    assert "llm calls 2" in trace.splitlines()[1]


def test_async_streams_with_one_prompt_read_in_any_order_are_one_call_each(repo: Path) -> None:
    """`astream_chat` twice with the same messages, read the other way round, or a chunk of
    each in turn: each stream's body (its `stream_chat`) belongs to the call that returned
    it — it was taken for the older call's, and the other body became a third call."""
    from llama_index.core.llms import ChatMessage

    llm = RuleLLM()
    messages = [ChatMessage(role="user", content="the same question")]

    async def reversed_order() -> None:
        first, second = await llm.astream_chat(messages), await llm.astream_chat(messages)
        [r async for r in second]
        [r async for r in first]

    async def in_turn() -> None:
        first, second = await llm.astream_chat(messages), await llm.astream_chat(messages)
        b, a = second.__aiter__(), first.__aiter__()
        await b.__anext__()
        await a.__anext__()
        [r async for r in b]
        [r async for r in a]

    with recording(repo):
        asyncio.run(reversed_order())
        asyncio.run(in_turn())
    run = only_run(repo)
    assert_llm_steps_line_up(run, 4)
    assert {t for _, t in run.text("response", kind="llm")} == {"an answer from the rule llm"}


def test_async_streams_dropped_unread_are_freed(repo: Path) -> None:
    """A client gone before the first token: the app drops the stream it opened. What the
    stream holds is freed at once (the call waits for its end without keeping it)."""
    import weakref

    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback

    class Held:
        pass

    held: list[weakref.ref[Held]] = []

    class HoldingLLM(CustomLLM):
        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(model_name="holding")

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kw: Any) -> CompletionResponse:
            return CompletionResponse(text="t")

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kw: Any) -> Any:
            yield CompletionResponse(text="t", delta="t")

        @llm_completion_callback()
        async def astream_complete(self, prompt: str, formatted: bool = False, **kw: Any) -> Any:
            obj = Held()
            held.append(weakref.ref(obj))

            async def gen() -> Any:
                mine = obj
                yield CompletionResponse(text=str(id(mine)), delta="x")

            return gen()

    async def main() -> None:
        llm = HoldingLLM()
        for i in range(20):
            await llm.astream_complete(f"prompt {i}")  # dropped unread

    with recording(repo):
        asyncio.run(main())
        gc.collect()
        assert len(held) == 20 and sum(r() is not None for r in held) == 0


def test_llm_streams_finished_abandoned_and_failed(repo: Path) -> None:
    llm = RuleLLM()
    with recording(repo):
        finished = "".join(r.delta or "" for r in llm.stream_complete("first"))
        abandoned = llm.stream_complete("second")
        next(abandoned)
        abandoned.close()  # the user stops reading: GeneratorExit inside LlamaIndex's wrapper
        broken = RuleLLM(fail_after=2).stream_complete("third")
        with pytest.raises(RuntimeError, match="stream broke"):
            list(broken)
    run = only_run(repo)
    assert_llm_steps_line_up(run, 3)
    responses = [t for _, t in run.text("response", kind="llm")]
    print("RESPONSES", responses)
    assert responses[0] == finished == "an answer from the rule llm"
    assert responses[1] == "an\n[stream abandoned]"
    assert responses[2] == "an answer\n[error: RuntimeError]"
    assert steps(run, "ttft_ms") == [0, 1, 2]
    latency = dict(run.metric("latency_ms", kind="llm"))
    assert all(0 < ttft <= latency[step] for step, ttft in run.metric("ttft_ms", kind="llm"))
    assert [v for _, v in run.metric("errors", kind="llm")] == [1.0]  # abandoning is no error
    assert not [k for k in run.texts if k[0] == "trace"]  # bare LLM calls are not requests


def test_components_built_after_activation_copy_and_pickle_as_without_it(
        repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Their callback manager holds aim-llama's handler: a deep copy shares it (and records
    into the same run), a pickle refers to it — the unpickling process's own handler, or one
    that does nothing where aim-llama is off — and LlamaIndex drops nothing with a warning."""
    import copy
    import pickle
    import subprocess

    from llama_index.core.node_parser import SentenceSplitter

    docs = [Document(text=f"Document number {i} talks about topic {i % 3}.") for i in range(6)]
    with recording(repo):
        splitter = copy.deepcopy(SentenceSplitter(chunk_size=64, chunk_overlap=0))
        chunks = splitter.get_nodes_from_documents(docs[:2])
        copy.deepcopy(MockLLM(max_tokens=2)).complete("copied llm")
        manager = copy.deepcopy(Settings.callback_manager)
        assert manager.handlers == Settings.callback_manager.handlers
        engine = VectorStoreIndex.from_documents(docs).as_query_engine(similarity_top_k=2)
        data = pickle.dumps(engine)
        pickle.loads(data).query(QUESTIONS[0])
    assert "unpickleable attribute callback_manager" not in caplog.text, caplog.text
    run = only_run(repo)
    assert [t for _, t in run.text("chunk", kind="chunking")][:len(chunks)] == [
        c.get_content() for c in chunks]  # once each
    assert "copied llm" in run.text("prompt", kind="llm")[0][1]
    assert [t for _, t in run.text("question", kind="query")] == [QUESTIONS[0]]
    elsewhere = subprocess.run(
        [sys.executable, "-c", "import pickle, sys; e = pickle.loads(sys.stdin.buffer.read()); "
         "print(type(e.callback_manager.handlers[-1]).__name__, e.query('q').response)"],
        input=data, capture_output=True, env=clean_env(), timeout=120)
    assert elsewhere.returncode == 0, elsewhere.stderr.decode()
    assert elsewhere.stdout.decode().startswith("_Inert "), elsewhere.stdout


def test_a_copy_made_while_recording_follows_later_activations(
        repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A manager aim-llama cannot take its handler off at `uninstrument()` (a deep copy's, an
    engine unpickled in this process) drops events quietly while aim-llama is off and records
    into the run of the next activation."""
    import copy
    import pickle

    from llama_index.core.node_parser import SentenceSplitter

    docs = [Document(text=f"Document number {i} talks about topic {i % 3}.") for i in range(2)]
    with recording(repo):
        copied = copy.deepcopy(SentenceSplitter(chunk_size=64, chunk_overlap=0))
        data = pickle.dumps(SentenceSplitter(chunk_size=64, chunk_overlap=0))
    off = copied.get_nodes_from_documents(docs)  # aim-llama off: nothing, and no warning
    unpickled = pickle.loads(data)  # (its handler: an inert one, aim-llama being off)
    unpickled.get_nodes_from_documents(docs)
    assert not [r for r in caplog.records if r.name.startswith("aim_llama")], caplog.text
    before = Settings.callback_manager
    Settings.callback_manager = unpickled.callback_manager  # (the inert handler must not stay
    try:  # beside the next activation's, which it would pass every event on to: twice)
        with recording(repo):
            again = copied.get_nodes_from_documents(docs)
            unpickled.get_nodes_from_documents(docs)
    finally:
        Settings.callback_manager = before
    second = only_run(repo)  # (the first activation recorded nothing: it made no run)
    chunks = [t for _, t in second.text("chunk", kind="chunking")]
    assert chunks == [n.get_content() for n in again] * 2 and len(off) == len(again)
    assert len(second.metric("latency_ms", kind="node_parsing")) == 2


def test_getting_and_updating_prompts_is_no_request(repo: Path) -> None:
    """`get_prompts()` / `update_prompts()` (LlamaIndex's way to customise a pipeline) run
    spanned accessors: set-up, not requests with an empty question and a 0.01 ms latency."""
    from llama_index.core import PromptTemplate

    index = _index()
    with recording(repo):
        engine = index.as_query_engine(similarity_top_k=2)
        assert "response_synthesizer:text_qa_template" in engine.get_prompts()
        engine.update_prompts({"response_synthesizer:text_qa_template": PromptTemplate(
            "Context: {context_str}\nQuestion: {query_str}\nAnswer:")})
        index.as_retriever().get_prompts()
        engine.query(QUESTIONS[0])
    run = only_run(repo)
    assert [t for _, t in run.text("question", kind="query")] == [QUESTIONS[0]]
    assert [s for s, _ in run.metric("latency_ms", kind="query")] == [0]
    assert [t.splitlines()[0] for t in traces(run, "query")] == [f"query: {QUESTIONS[0]}"]
    assert not traces(run, "retrieve")
    (prompt,) = [t for _, t in run.text("prompt", kind="llm")]
    assert "Question: " + QUESTIONS[0] in prompt  # the updated template is the one used


# -- chat engines --------------------------------------------------------------------------
def test_chat_engines_condense_context_and_stream_chat(repo: Path) -> None:
    index = _index()
    with recording(repo):
        condense = index.as_chat_engine(chat_mode="condense_plus_context")
        condense.chat("hello condense")
        condense.reset()  # (asks nothing: not a chat request)
        index.as_chat_engine(chat_mode="context").chat("hello context")
        streaming = index.as_chat_engine(chat_mode="context", llm=RuleLLM()).stream_chat(
            "hello stream")
        streamed = "".join(streaming.response_gen)
        for _ in range(500):  # the engine writes the answer to its history in a thread
            if streaming.is_done:
                break
            time.sleep(0.01)
    run = only_run(repo)
    n = len(run.text("prompt", kind="llm"))
    assert n == 3
    assert_llm_steps_line_up(run, n)
    tr = traces(run, "chat")
    assert sorted(t.splitlines()[0] for t in tr) == [
        "chat: hello condense", "chat: hello context", "chat: hello stream"]
    answers = [t for _, t in run.text("answer", kind="chat")]
    assert streamed in answers
    assert len(run.metric("latency_ms", kind="chat")) == 3


def test_retriever_alone(repo: Path) -> None:
    docs = [Document(text=f"Document number {i} talks about topic {i % 3}.") for i in range(6)]
    index = VectorStoreIndex.from_documents(docs, embed_model=WordEmbedding())
    retriever = index.as_retriever(similarity_top_k=3)
    with recording(repo):
        nodes = retriever.retrieve("which topic? 1")
    run = only_run(repo)
    assert [v for _, v in run.metric("retrieved_nodes", **RETRIEVE)] == [float(len(nodes))]
    scores = [n.score for n in nodes]
    assert len(set(scores)) > 1  # the scores differ: the best one is not any one
    assert [v for _, v in run.metric("top_score", **RETRIEVE)] == [pytest.approx(max(scores))]
    (trace,) = traces(run, "retrieve")
    assert trace.startswith("retrieve: which topic? 1\n")


def test_a_retrieval_without_scores_keeps_the_next_ones_on_their_own_steps(repo: Path) -> None:
    """`top_score` is missing for nodes without scores; the retrieval's other values keep
    their step, so the Nth `top_score` and the Nth `retrieved` are the same retrieval."""
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, TextNode

    class SometimesScored(BaseRetriever):
        def _retrieve(self, query_bundle: Any) -> list[NodeWithScore]:
            n = int(query_bundle.query_str)
            return [NodeWithScore(node=TextNode(text=f"node {n}"),
                                  score=None if n % 2 else n / 10)]

    retriever = SometimesScored()
    with recording(repo):
        for n in range(4):
            retriever.retrieve(str(n))
    run = only_run(repo)
    ctx = {"kind": "retrieve", "retriever": "SometimesScored"}
    assert [s for s, _ in run.metric("retrieved_nodes", **ctx)] == [0, 1, 2, 3]
    assert run.metric("top_score", **ctx) == [(0, 0.0), (2, pytest.approx(0.2))]
    assert [(s, t.splitlines()[0]) for s, t in run.text("retrieved", **ctx)] == [
        (n, f"query: {n}") for n in range(4)]


def test_tool_calls_not_sampled_keep_the_sampled_ones_on_their_steps(repo: Path) -> None:
    """With sampling, a tool call's text lands on the step of its latency: the Nth call's."""
    from llama_index.core.tools import FunctionTool

    tool = FunctionTool.from_defaults(lambda i: i * 2, name="double", description="x2")
    with recording(repo, sample_rate=0.5):
        for i in range(30):
            tool.call(i=i)
    run = only_run(repo)
    ctx = {"kind": "tool", "tool": "double"}
    assert [s for s, _ in run.metric("latency_ms", **ctx)] == list(range(30))
    texts = run.text("tool_call", **ctx)
    assert 3 <= len(texts) <= 27, len(texts)  # Binomial(30, 0.5): outside, p < 1e-5
    for step, text in texts:
        assert text.startswith(f"double(i={step})\n-> {step * 2}"), (step, text)


def test_a_fusion_retrievers_scores_stay_apart_from_its_sub_retrievers(repo: Path) -> None:
    """Reciprocal-rank scores (~0.03) and the cosine scores they fuse (~0.9) are different
    scales: each retriever class gets its own `top_score` line, so neither chart is garbage."""
    from llama_index.core.retrievers import QueryFusionRetriever

    docs = [Document(text=f"Document number {i} talks about topic {i % 3}.") for i in range(6)]
    index = VectorStoreIndex.from_documents(docs, embed_model=WordEmbedding())
    fusion = QueryFusionRetriever(
        [index.as_retriever(similarity_top_k=3), index.as_retriever(similarity_top_k=2)],
        num_queries=1, mode="reciprocal_rerank", similarity_top_k=3, use_async=False)
    with recording(repo):
        fused = fusion.retrieve("which topic? 1")
    run = only_run(repo)
    fused_ctx = {"kind": "retrieve", "retriever": "QueryFusionRetriever"}
    assert [v for _, v in run.metric("top_score", **fused_ctx)] == [
        pytest.approx(max(n.score for n in fused))]
    assert [v for _, v in run.metric("retrieved_nodes", **fused_ctx)] == [float(len(fused))]
    inner = [v for _, v in run.metric("top_score", **RETRIEVE)]
    assert len(inner) == 2 and min(inner) > 10 * max(n.score for n in fused), inner
    assert {ctx.get("retriever") for name, ctx in map(lambda s: (s[0], dict(s[1])), run.sequences())
            if name == "top_score"} == {"QueryFusionRetriever", "VectorIndexRetriever"}
    (trace,) = traces(run, "retrieve")
    assert "QueryFusionRetriever.retrieve" in trace and trace.count("VectorIndexRetriever") == 2


def test_structured_llm_rerank(repo: Path) -> None:
    from llama_index.core.postprocessor.structured_llm_rerank import StructuredLLMRerank

    class MyRerank(StructuredLLMRerank):  # a subclass: LlamaIndex spans both methods
        def _postprocess_nodes(self, nodes: Any, query_bundle: Any = None) -> Any:
            return super()._postprocess_nodes(nodes, query_bundle)

    engine = _index().as_query_engine(
        similarity_top_k=3, node_postprocessors=[StructuredLLMRerank(llm=RuleLLM(), top_n=2)])
    mine = _index().as_query_engine(
        similarity_top_k=3, node_postprocessors=[MyRerank(llm=RuleLLM(), top_n=2)])
    with recording(repo):
        engine.query("rank these")
        # the async path has no span of its own: its events fall in the engine's span
        asyncio.run(engine.aquery("rank these"))
        mine.query("rank these")
    run = only_run(repo)
    ctx = {"kind": "rerank", "reranker": "StructuredLLMRerank"}
    assert run.metric("rerank_nodes_in", **ctx) == [(0, 3.0), (1, 3.0)]
    assert run.metric("rerank_nodes_out", **ctx) == [(0, 2.0), (1, 2.0)]
    assert [v for _, v in run.metric("top_score", **ctx)] == [9.0, 9.0]
    assert len(run.metric("latency_ms", **ctx)) == 2  # (once: from its event, not its span too)
    text = run.text("reranked", **ctx)[0][1]
    assert text.startswith("before:\nquery: rank these\n") and "\nafter:\n" in text
    # the subclass's rerank: once (its events, in the inner span), not again at its outer one
    mine_ctx = {"kind": "rerank", "reranker": "MyRerank"}
    assert run.metric("rerank_nodes_out", **mine_ctx) == [(0, 2.0)]
    assert {dict(c).get("reranker") for n, c in run.sequences() if n == "rerank_nodes_in"} == {
        "StructuredLLMRerank", "MyRerank"}
    assert_llm_steps_line_up(run, 6)  # the reranker's structured call + the answer, 3 times
    # the reranker is in the trace (LlamaIndex spans only its private `_postprocess_nodes`),
    # with its LLM call under it
    trace = traces(run, "query")[0].splitlines()
    (line,) = [i for i, t in enumerate(trace) if "StructuredLLMRerank._postprocess_nodes" in t]
    assert "RuleLLM." in trace[line + 1] and trace[line + 1].startswith(
        " " * (len(trace[line]) - len(trace[line].lstrip()) + 2)), trace


def test_node_postprocessors_without_rerank_events_record_rerank_values(repo: Path) -> None:
    """LLMRerank, a similarity cutoff and most of LlamaIndex's node postprocessors emit no
    ReRank event: their values come from their span (nodes in and out, scores, latency, the
    nodes before and after), one line per postprocessor class; values of one call share a
    step."""
    from llama_index.core.postprocessor import LLMRerank, SimilarityPostprocessor
    from llama_index.core.postprocessor.types import BaseNodePostprocessor

    class Rescore(BaseNodePostprocessor):  # changes the nodes it is given in place
        def _postprocess_nodes(self, nodes: Any, query_bundle: Any = None) -> Any:
            for i, n in enumerate(nodes):
                n.score = 100.0 + i
            return nodes

    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent

    class EventRescore(Rescore):  # the same, with ReRank events (as integrations emit them)
        def _postprocess_nodes(self, nodes: Any, query_bundle: Any = None) -> Any:
            get_dispatcher().event(ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=3,
                                                    model_name="m"))
            out = super()._postprocess_nodes(nodes, query_bundle)
            get_dispatcher().event(ReRankEndEvent(nodes=out))
            return out

    docs = [Document(text=f"Document number {i} talks about topic {i % 3}.") for i in range(6)]
    index = VectorStoreIndex.from_documents(docs, embed_model=WordEmbedding())
    scores = [n.score for n in index.as_retriever(similarity_top_k=3).retrieve("topic 1")]
    cutoff = sorted(scores)[1]  # keeps the best two of three
    assert len(set(scores)) == 3, scores
    engine = index.as_query_engine(similarity_top_k=3, node_postprocessors=[
        SimilarityPostprocessor(similarity_cutoff=cutoff),
        LLMRerank(llm=RuleLLM(), top_n=1, choice_batch_size=5)])
    rescored = index.as_query_engine(similarity_top_k=3, node_postprocessors=[Rescore()])
    event_rescored = index.as_query_engine(similarity_top_k=3,
                                           node_postprocessors=[EventRescore()])
    with recording(repo):
        engine.query("topic 1")
        engine.query("topic 1")
        asyncio.run(engine.aquery("topic 1"))  # (LLMRerank's own async path has no span)
        rescored.query("topic 1")
        event_rescored.query("topic 1")
    run = only_run(repo)
    cut = {"kind": "rerank", "reranker": "SimilarityPostprocessor"}
    llm = {"kind": "rerank", "reranker": "LLMRerank"}
    assert run.metric("rerank_nodes_in", **cut) == [(0, 3.0), (1, 3.0), (2, 3.0)]
    assert run.metric("rerank_nodes_out", **cut) == [(0, 2.0), (1, 2.0), (2, 2.0)]
    assert [v for _, v in run.metric("top_score", **cut)] == [pytest.approx(max(scores))] * 3
    assert run.metric("rerank_nodes_in", **llm) == [(0, 2.0), (1, 2.0)]
    assert run.metric("rerank_nodes_out", **llm) == [(0, 1.0), (1, 1.0)]
    assert run.metric("top_score", **llm) == [(0, 9.0), (1, 9.0)]  # the LLM's relevance
    assert [s for s, _ in run.metric("latency_ms", **llm)] == [0, 1]
    (before_after, _) = [t for _, t in run.text("reranked", **llm)]
    before, after = before_after.split("\nafter:\n")
    assert before.startswith("before:\nquery: topic 1\n") and before.count("\n") == 3
    assert len(after.splitlines()) == 1 and "9.000" in after, after
    # the reranker's LLM call and the answer, per query (and the last two queries' answers)
    assert_llm_steps_line_up(run, 8)
    # the nodes before, as they were given: not as the postprocessor left them (from its
    # span, or from its ReRank events)
    for reranker in ("Rescore", "EventRescore"):
        (text,) = [t for _, t in run.text("reranked", kind="rerank", reranker=reranker)]
        before, after = text.split("\nafter:\n")
        assert "score=100.0000" not in before and f"score={max(scores):.4f}" in before, text
        assert "score=100.0000" in after and "score=102.0000" in after, text
        # (the best score out, though the nodes come out in rising order)
        assert run.metric("top_score", kind="rerank", reranker=reranker) == [(0, 102.0)]


def test_a_structured_llm_call_keeps_the_providers_token_usage(repo: Path) -> None:
    """`as_structured_llm(...)` returns the parsed object: the provider's usage is on the call
    nested inside it, and is the one recorded (not an estimate of the outer prompt)."""
    from llama_index.core.llms import ChatMessage
    from pydantic import BaseModel

    class Ranking(BaseModel):
        documents: list[dict[str, int]]

    structured = RuleLLM(usage=USAGE).as_structured_llm(Ranking)
    with recording(repo):
        out = structured.chat([ChatMessage(role="user", content="rank by document_number")])
        assert out.raw.documents[0] == {"document_number": 2, "relevance": 9}
        structured.complete("rank by document_number")  # complete → chat → the provider's call
    run = only_run(repo)
    assert_llm_steps_line_up(run, 2, source="provider")
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert [v for _, v in run.metric(name, kind="llm", source="provider")] == [USAGE[name]] * 2
        assert not run.metric(name, kind="llm", source="estimated")


def test_the_providers_counts_are_read_wherever_providers_put_them(repo: Path) -> None:
    """OpenAI-style `raw["usage"]` (its total kept as reported: reasoning tokens make it more
    than prompt + completion), Gemini-style `raw["usage_metadata"]`, and the response's
    `additional_kwargs` (llama-index-llms-openai's), also for a chat made of a completion."""
    from llama_index.core.llms import ChatMessage

    reasoning = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 25}
    gemini = {"prompt_token_count": 12, "candidates_token_count": 8, "total_token_count": 21}
    with recording(repo):
        RuleLLM(usage=reasoning).complete("a")
        RuleLLM(usage=gemini, usage_at="usage_metadata").complete("b")
        RuleLLM(usage=USAGE, usage_at="additional_kwargs").complete("c")
        RuleLLM(usage=USAGE, usage_at="additional_kwargs").chat(
            [ChatMessage(role="user", content="d")])
    run = only_run(repo)
    expected = {"prompt_tokens": [11, 12, 11, 11], "completion_tokens": [7, 8, 7, 7],
                "total_tokens": [25, 21, 18, 18]}
    for name, values in expected.items():
        assert run.metric(name, kind="llm", source="provider") == list(enumerate(values)), name
        assert not run.metric(name, kind="llm", source="estimated"), name


def test_a_streamed_structured_llm_call_is_one_call(repo: Path) -> None:
    """`as_structured_llm(...).stream_chat` / `astream_chat` return a stream whose body calls
    the wrapped LLM only as it is read, after the outer call's span ended: that inner call is
    part of the outer one (it was a second LLM call: its tokens counted twice), as for
    `chat`. Another LLM called by the application between two chunks stays its own call."""
    from llama_index.core.llms import ChatMessage
    from pydantic import BaseModel

    class Ranking(BaseModel):
        documents: list[dict[str, int]]

    structured = RuleLLM().as_structured_llm(Ranking)
    other = RuleLLM()
    question = [ChatMessage(role="user", content="rank by document_number")]

    async def read_async() -> list[Any]:
        gen = await structured.astream_chat(question)
        return [chunk async for chunk in gen]

    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler

    judge = RuleLLM()

    class Moderation(BaseEventHandler):  # the app's own handler: calls an LLM on a chunk
        @classmethod
        def class_name(cls) -> str:
            return "Moderation"

        def handle(self, event: Any, **kwargs: Any) -> None:
            if type(event).__name__ == "LLMChatInProgressEvent" and not judge.calls:
                judge.complete("moderate this chunk")

    moderation = Moderation()
    with recording(repo):
        chunks = []
        for chunk in structured.stream_chat(question):
            chunks.append(chunk)
            if len(chunks) == 1:
                other.complete("between two chunks")  # the app's own call, in its loop
        assert chunks[-1].raw.documents[0] == {"document_number": 2, "relevance": 9}
        assert asyncio.run(read_async())[-1].raw.documents[0] == {"document_number": 2,
                                                                   "relevance": 9}
        get_dispatcher().add_event_handler(moderation)
        try:
            list(structured.stream_chat(question))
        finally:
            get_dispatcher().event_handlers.remove(moderation)
        assert judge.calls == 1
    run = only_run(repo)
    # a handler's call made while a stream ran is a call of its own, too
    assert "moderate this chunk" in [t for _, t in run.text("prompt", kind="llm")]
    assert len(run.text("prompt", kind="llm")) == 5
    # (steps number calls as they end: the app's own call ended before the stream it read)
    prompts = [t for _, t in run.text("prompt", kind="llm")]
    assert prompts[:3] == ["between two chunks", "user: rank by document_number",
                           "user: rank by document_number"], prompts
    assert sorted(prompts[3:]) == ["moderate this chunk", "user: rank by document_number"]
    responses = [t for _, t in run.text("response", kind="llm")]
    assert responses[0] == "an answer from the rule llm"
    assert all('"document_number":2' in r.replace(" ", "") for r in responses[1:3]), responses
    assert_llm_steps_line_up(run, 5)


def test_sub_question_query_engine(repo: Path) -> None:
    from llama_index.core.query_engine import SubQuestionQueryEngine
    from llama_index.core.question_gen import LLMQuestionGenerator
    from llama_index.core.tools import QueryEngineTool

    rule = RuleLLM()
    tool = QueryEngineTool.from_defaults(_index().as_query_engine(), name="docs",
                                         description="the docs")
    engine = SubQuestionQueryEngine.from_defaults(
        query_engine_tools=[tool], llm=rule,
        question_gen=LLMQuestionGenerator.from_defaults(llm=rule), use_async=False)
    with recording(repo):
        engine.query("compare topic 1 and topic 2")
    run = only_run(repo)
    # question generation + 2 sub-answers (MockLLM) + the final synthesis
    assert_llm_steps_line_up(run, 4)
    (trace,) = traces(run, "query")  # nested queries stay inside the one root request
    assert trace.startswith("query: compare topic 1 and topic 2\n")
    assert trace.count("RetrieverQueryEngine.query") == 2
    assert [t for _, t in run.text("question", kind="query")] == ["compare topic 1 and topic 2"]


# -- agents and workflows ------------------------------------------------------------------
async def _run(workflow: Any, **kwargs: Any) -> Any:
    return await workflow.run(**kwargs)


def _add(a: int, b: int) -> int:
    """Add two numbers."""
    if a < 0:
        raise ValueError("negative numbers are not supported")
    return a + b


def test_function_agent_with_tool(repo: Path) -> None:
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    llm = ScriptedToolLLM()
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(_add, name="add")], llm=llm)

    async def main() -> Any:
        return await agent.run(user_msg="what is 2+3?")

    with recording(repo):
        result = asyncio.run(main())
    assert "final: 5" in str(result)
    run = only_run(repo)
    assert llm.calls == 2
    assert_llm_steps_line_up(run, 2, source="provider")
    assert [v for _, v in run.metric("total_tokens", kind="llm", source="provider")] == [
        float(USAGE["total_tokens"])] * 2
    assert "tool_call: add" in run.text("response", kind="llm")[0][1]
    (call,) = [t for _, t in run.text("tool_call", kind="tool", tool="add")]
    assert call == "add(a=2, b=3)\n-> 5"
    assert len(run.metric("latency_ms", kind="tool", tool="add")) == 1
    (trace,) = traces(run, "agent")
    assert trace.startswith("agent: what is 2+3?\n")
    # the header's totals: both calls, the provider's exact counts
    assert trace.splitlines()[1].endswith(" · ok · llm calls 2 · tokens 36"), trace
    # each step's latency is its own (as its trace line shows it), not the run's so far
    shown = [float(ms) for ms in re.findall(r"\.run_agent_step ([\d.]+)ms", trace)]
    timed = [v for _, v in run.metric("latency_ms", kind="agent_step", step="run_agent_step")]
    assert len(timed) == len(shown) == 2
    assert all(abs(t - s) <= 0.05 + 1e-9 for t, s in zip(timed, shown, strict=True)), (timed, shown)
    assert "FunctionTool.acall" in trace and "tool=add" in trace
    assert "agent=" not in trace  # (one agent: no need to say which)
    assert [t for _, t in run.text("answer", kind="agent")] == ["final: 5"]
    assert "scripted-tool-llm" in run.params["llm_models"]


def test_llm_models_lists_each_model_with_its_token_limit(repo: Path) -> None:
    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback

    class _Unnamed(CustomLLM):  # no model name: LlamaIndex calls every such LLM "custom_llm"
        max_new_tokens: int = 5
        api_token: str = "hf_secret_value"

        def to_payload(self) -> dict[str, Any]:  # what LlamaIndex's events carry
            return {**super().to_payload(), "tokenizer_name": "gpt2"}

        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata()

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kw: Any) -> CompletionResponse:
            return CompletionResponse(text=type(self).__name__)

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kw: Any) -> Any:
            raise NotImplementedError

    class FirstLLM(_Unnamed):
        pass

    class SecondLLM(_Unnamed):
        pass

    with recording(repo):
        MockLLM(max_tokens=7).complete("x")
        FirstLLM().complete("x")
        SecondLLM().complete("x")
    models = only_run(repo).params["llm_models"]
    assert models["MockLLM"]["max_tokens"] == 7  # a token limit is not a credential
    assert {"FirstLLM", "SecondLLM"} <= set(models), models  # not one "custom_llm" for both
    assert models["SecondLLM"]["max_new_tokens"] == 5, models
    assert models["SecondLLM"]["python_class"] == "SecondLLM"
    assert models["SecondLLM"]["tokenizer_name"] == "gpt2"
    assert not any("hf_secret" in str(v) or k == "api_token" for m in models.values()
                   for k, v in m.items())


def test_tool_that_raises(repo: Path) -> None:
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    llm = ScriptedToolLLM(tool_args={"a": -1, "b": 3})
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(_add, name="add")], llm=llm)
    with recording(repo):
        result = asyncio.run(_run(agent, user_msg="what is -1+3?"))
    assert "negative numbers" in str(result)  # the agent carried on with the tool's error
    run = only_run(repo)
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0]
    (call,) = [t for _, t in run.text("tool_call", kind="tool", tool="add")]
    assert "-> error: ValueError: negative numbers are not supported" in call
    assert "error ValueError" in traces(run, "agent")[0]
    (entry,) = _log_records(repo, run.hash)
    assert entry["args"]["operation"] == "tool" and entry["args"]["span"] == "add"
    assert entry["args"]["exception_type"] == "ValueError"


@pytest.mark.parametrize("human", ["quick", "slower than the request TTL"])
def test_a_tool_waiting_for_human_input_is_not_an_error(repo: Path, human: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctx.wait_for_event` (human in the loop) pauses a tool by raising `WaitingForEvent`;
    LlamaIndex runs it again when the answer comes. Every approval was counted as a failed
    tool call (an `errors` point, a Logs entry, `-> error: WaitingForEvent`), and a human
    slower than the 30-minute request TTL (0.3 s here) lost the request's answer."""
    from aim_llama import observer

    if human != "quick":
        monkeypatch.setattr(observer, "ROOT_TTL", 0.3)
        monkeypatch.setattr(observer, "SWEEP_INTERVAL", 0.05)
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool
    from llama_index.core.workflow import Context, HumanResponseEvent, InputRequiredEvent

    async def dangerous(ctx: Context, what: str) -> str:
        """Ask a human before doing something."""
        answer = await ctx.wait_for_event(HumanResponseEvent, waiter_id="confirm",
                                          waiter_event=InputRequiredEvent(prefix=f"{what}?"))
        return f"human said {answer.response}"

    dangerous.__annotations__ = {"ctx": Context, "what": str, "return": str}  # (not strings)
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(async_fn=dangerous)],
                          llm=ScriptedToolLLM(tool_name="dangerous", tool_args={"what": "drop"}))

    async def main() -> Any:
        handler = agent.run(user_msg="drop the table")
        async for event in handler.stream_events():
            if isinstance(event, InputRequiredEvent):
                if human != "quick":
                    await asyncio.sleep(0.6)
                    MockLLM(max_tokens=2).complete("meanwhile")  # (spans: sweeps run)
                handler.ctx.send_event(HumanResponseEvent(response="yes"))
        return await handler

    with recording(repo):
        result = asyncio.run(main())
    assert "final: human said yes" in str(result)
    run = only_run(repo)
    assert not run.metric("errors", kind="tool") and not run.metric("errors")
    assert _log_records(repo, run.hash) == []
    calls = [t for _, t in run.text("tool_call", kind="tool", tool="dangerous")]
    assert calls[-1] == "dangerous(what=drop)\n-> human said yes", calls
    assert all("error" not in c for c in calls), calls
    assert len(run.metric("latency_ms", kind="tool", tool="dangerous")) == 1  # the call that ran
    (trace,) = traces(run, "agent")
    assert "waiting" in trace and "error" not in trace, trace
    assert [t for _, t in run.text("answer", kind="agent")] == ["final: human said yes"]


def test_a_workflow_step_waiting_longer_than_the_request_ttl_keeps_its_request(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that calls `ctx.wait_for_event` itself (the workflows catch the pause inside
    the step: no span says so) expired with its request after 30 minutes (0.3 s here) of
    waiting for a human: the answer was lost. A run still going is never idle-expired."""
    from llama_index.core.workflow import (
        Context,
        HumanResponseEvent,
        InputRequiredEvent,
        StartEvent,
        StopEvent,
        Workflow,
        step,
    )

    from aim_llama import observer

    monkeypatch.setattr(observer, "ROOT_TTL", 0.3)
    monkeypatch.setattr(observer, "SWEEP_INTERVAL", 0.05)

    class Approval(Workflow):
        @step
        async def ask(self, ctx: Context, ev: StartEvent) -> StopEvent:
            answer = await ctx.wait_for_event(HumanResponseEvent, waiter_id="ok",
                                              waiter_event=InputRequiredEvent(prefix="ok?"))
            return StopEvent(result=f"human said {answer.response}")

    Approval.ask.__annotations__.update(ctx=Context, ev=StartEvent, **{"return": StopEvent})

    async def main() -> Any:
        handler = Approval(timeout=30).run(query="deploy?")
        async for event in handler.stream_events():
            if isinstance(event, InputRequiredEvent):
                await asyncio.sleep(0.6)
                MockLLM(max_tokens=2).complete("meanwhile")  # (spans: sweeps run)
                handler.ctx.send_event(HumanResponseEvent(response="yes"))
        return await handler

    with recording(repo):
        assert asyncio.run(main()) == "human said yes"
    run = only_run(repo)
    assert [t for _, t in run.text("answer", kind="workflow")] == ["human said yes"]
    (trace,) = traces(run, "workflow")
    assert "expired" not in trace and " · ok · " in trace, trace


def test_a_tool_the_model_made_up_is_a_tool_call_and_an_error(repo: Path) -> None:
    """The model asked for a tool the agent does not have: LlamaIndex answers "Tool … not
    found" without running any tool, so no tool span recorded it: nothing said so."""
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    agent = FunctionAgent(tools=[FunctionTool.from_defaults(_add, name="add")],
                          llm=ScriptedToolLLM(tool_name="subtract", tool_args={"a": 5, "b": 3}))
    with recording(repo):
        result = asyncio.run(_run(agent, user_msg="what is 5-3?"))
    assert "Tool subtract not found" in str(result)
    run = only_run(repo)
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0]
    # the name is the model's: in the (redacted) text only, not in a context or the trace
    (call,) = [t for _, t in run.text("tool_call", kind="tool", tool="<not found>")]
    assert call.startswith("subtract(a=5, b=3)\n-> error: RuntimeError: Tool subtract not found")
    assert not run.text("tool_call", kind="tool", tool="add")
    (entry,) = _log_records(repo, run.hash)
    assert entry["args"]["operation"] == "tool" and entry["args"]["span"] == "<not found>"
    assert "tool=<not found> (not run: error)" in traces(run, "agent")[0]

    # (a tool that ran and failed stays one error: test_tool_that_raises)


@pytest.mark.parametrize("ignored", ["function_call", "agent_step"])
def test_a_made_up_tool_is_an_error_whatever_else_is_ignored(repo: Path, ignored: str) -> None:
    """Errors follow `exception` alone: with agent steps ignored the made-up tool's error
    was not recorded at all."""
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    agent = FunctionAgent(tools=[FunctionTool.from_defaults(_add, name="add")],
                          llm=ScriptedToolLLM(tool_name="subtract", tool_args={"a": 5, "b": 3}))
    with recording(repo, event_starts_to_ignore=[ignored]):
        asyncio.run(_run(agent, user_msg="what is 5-3?"))
    run = only_run(repo)
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0]
    (entry,) = _log_records(repo, run.hash)
    assert entry["args"]["span"] == "<not found>"
    assert bool(run.text("tool_call", kind="tool", tool="<not found>")) == (ignored != "function_call")


def test_an_agent_workflows_steps_say_which_agent_runs_them(repo: Path) -> None:
    """Every step of a multi-agent run read `AgentWorkflow.run_agent_step`: which agent made
    an LLM call or a tool call could not be told."""
    from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent
    from llama_index.core.tools import FunctionTool

    router = FunctionAgent(name="router", description="routes", can_handoff_to=["math"],
                           llm=ScriptedToolLLM(tool_name="handoff",
                                               tool_args={"to_agent": "math", "reason": "sums"}))
    math = FunctionAgent(name="math", description="does sums",
                         tools=[FunctionTool.from_defaults(_add, name="add")],
                         llm=ScriptedToolLLM())
    workflow = AgentWorkflow(agents=[router, math], root_agent="router")
    with recording(repo):
        asyncio.run(_run(workflow, user_msg="what is 2+3?"))
    (trace,) = traces(only_run(repo), "agent")
    steps = [line for line in trace.splitlines() if "run_agent_step" in line]
    assert len(steps) == 2 and "agent=router" in steps[0] and "agent=math" in steps[1], trace


def test_a_failing_tool_in_a_full_trace_is_one_error(repo: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the trace's 400 lines (7 here) tool spans are not in the tree: the agent's
    `call_tool` step took the tool's error for a tool never run and counted it again."""
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    from aim_llama import observer

    monkeypatch.setattr(observer, "MAX_TRACE_NODES", 7)
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(_add, name="add")],
                          llm=ScriptedToolLLM(tool_args={"a": -1, "b": 3}))
    with recording(repo):
        asyncio.run(_run(agent, user_msg="what is -1+3?"))
    run = only_run(repo)
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0]
    (call,) = [t for _, t in run.text("tool_call", kind="tool", tool="add")]
    assert "ValueError: negative numbers" in call
    (trace,) = traces(run, "agent")
    assert "more spans not listed" in trace and "not run" not in trace, trace


def test_an_llm_failing_inside_a_tool_is_one_error_not_two(repo: Path) -> None:
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    def ask_backend(x: int) -> str:
        """Ask a backend LLM (which is down)."""
        return FailingLLM().complete(f"about {x}").text

    agent = FunctionAgent(tools=[FunctionTool.from_defaults(ask_backend, name="ask_backend")],
                          llm=ScriptedToolLLM(tool_name="ask_backend", tool_args={"x": 1}))
    with recording(repo):
        asyncio.run(_run(agent, user_msg="go"))
    run = only_run(repo)
    assert [v for _, v in run.metric("errors", kind="llm")] == [1.0]  # where it happened
    assert not run.metric("errors", kind="tool")
    assert len(_log_records(repo, run.hash)) == 1
    (call,) = [t for _, t in run.text("tool_call", kind="tool", tool="ask_backend")]
    assert "-> error: RuntimeError: backend down [REDACTED]" in call  # still shown


def test_a_tool_called_through_its_call_wrapper_is_one_tool_call(repo: Path) -> None:
    """`llm.predict_and_call` and structured output on a function-calling LLM call a tool as
    `tool(**kwargs)`: `FunctionTool.__call__` (hidden, a private method) runs `call` on the same
    tool. One `tool_call` and one latency each — it was recorded twice — and a failing tool,
    or an LLM failing inside one, is still one error."""
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools import FunctionTool
    from pydantic import BaseModel

    class Song(BaseModel):
        """A song."""

        title: str
        length: int

    def boom(a: int, b: int) -> int:
        """Fails."""
        raise ValueError("tool exploded")

    def ask_backend(x: int) -> str:
        """Ask a backend LLM (which is down)."""
        return FailingLLM().complete(f"about {x}").text

    with recording(repo):
        ScriptedToolLLM().predict_and_call([FunctionTool.from_defaults(_add, name="add")],
                                           user_msg="add 2 and 3")
        ScriptedToolLLM(tool_name="Song", tool_args={"title": "Blue", "length": 180}
                        ).structured_predict(Song, PromptTemplate("a song about {t}"), t="sky")
        ScriptedToolLLM(tool_name="boom").predict_and_call(
            [FunctionTool.from_defaults(boom, name="boom")], user_msg="boom",
            error_on_tool_error=False)
        ScriptedToolLLM(tool_name="ask_backend", tool_args={"x": 1}).predict_and_call(
            [FunctionTool.from_defaults(ask_backend, name="ask_backend")], user_msg="ask",
            error_on_tool_error=False)
    run = only_run(repo)
    for tool in ("add", "Song", "boom", "ask_backend"):
        assert len(run.text("tool_call", kind="tool", tool=tool)) == 1, tool
        assert len(run.metric("latency_ms", kind="tool", tool=tool)) == 1, tool
    ((_, add_call),) = run.text("tool_call", kind="tool", tool="add")
    assert add_call == "add(a=2, b=3)\n-> 5"
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0]  # boom's
    assert [v for _, v in run.metric("errors", kind="llm")] == [1.0]  # the backend's, once


def test_a_callback_manager_the_app_puts_in_settings_later_gets_the_handler_too(
        repo: Path) -> None:
    """`Settings.callback_manager = CallbackManager([LlamaDebugHandler()])` after activation
    (LlamaIndex's own idiom; the launcher and `import aim_llama.auto` always activate first):
    the CallbackManager channel (`chunk`, node parsing and synthesize latencies) went silent;
    the handler now joins the new manager at the next request, and leaves both on
    `uninstrument()`. The app's own handlers still see every event."""
    import weakref

    from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler

    from aim_llama.handler import AimLlamaHandler

    original = Settings.callback_manager
    debug = LlamaDebugHandler(print_trace_on_end=False)
    try:
        with recording(repo):
            Settings.callback_manager = CallbackManager([debug])
            docs = [Document(text=f"Document {i} is about topic {i % 3}. " * 5) for i in range(4)]
            engine = VectorStoreIndex.from_documents(docs).as_query_engine(similarity_top_k=2)
            for q in QUESTIONS[:3]:
                engine.query(q)
            ours = [h for h in Settings.callback_manager.handlers
                    if isinstance(h, AimLlamaHandler)]
            assert len(ours) == 1
            # an app that makes a manager per request: aim-llama keeps none of them alive
            kept = Settings.callback_manager
            gone = []
            for q in QUESTIONS[:3]:
                Settings.callback_manager = CallbackManager([])
                gone.append(weakref.ref(Settings.callback_manager))
                engine.retrieve(q)  # (a request: the new manager gets the handler)
                assert any(isinstance(h, AimLlamaHandler)
                           for h in Settings.callback_manager.handlers)
            Settings.callback_manager = kept
            engine.retrieve("one more")
            gc.collect()
            assert [ref() for ref in gone] == [None, None, None]
            # rebuilt with the old one's handlers (ours among them): still taken off at the end
            Settings.callback_manager = CallbackManager(list(kept.handlers))
            engine.retrieve("rebuilt")
        assert not [h for h in Settings.callback_manager.handlers
                    if isinstance(h, AimLlamaHandler)]
        Settings.callback_manager = kept
        assert not [h for m in (original, Settings.callback_manager) for h in m.handlers
                    if isinstance(h, AimLlamaHandler)]  # gone from both
    finally:
        Settings.callback_manager = original
    run = only_run(repo)
    assert len(run.text("chunk", kind="chunking")) == 4
    assert len(run.metric("latency_ms", kind="node_parsing")) == 1
    assert len(run.metric("latency_ms", kind="synthesize")) == 3
    assert len(debug.get_event_pairs(CBEventType.SYNTHESIZE)) == 3
    assert len(traces(run, "query")) == 3


def test_images_documents_and_thinking_in_messages_are_shown_by_placeholders(
        repo: Path) -> None:
    """A chat message's image, document or thinking block is not in `message.content` (text
    blocks only): the prompt showed `user: ` for an image. Now a placeholder naming where it
    came from (never its bytes); a response's thinking is shown before its text."""
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        CitableBlock,
        CitationBlock,
        DocumentBlock,
        ImageBlock,
        MessageRole,
        TextBlock,
        ThinkingBlock,
    )
    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback

    class ThinkingLLM(CustomLLM):
        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(model_name="thinking", is_chat_model=True)

        @llm_chat_callback()
        def chat(self, messages: Any, **kwargs: Any) -> ChatResponse:
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, blocks=[
                ThinkingBlock(content="it has whiskers"), TextBlock(text="A cat."),
                CitationBlock(title="Cats 101", source="https://example.com/cats",
                              cited_content=TextBlock(text="Cats have whiskers."),
                              additional_location_info={})]))

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            return CompletionResponse(text="unused")

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            raise NotImplementedError

    inline = "data:image/png;base64," + "iVBORw0KGgo" * 3000  # (an image given as a URL)
    messages = [
        ChatMessage(role=MessageRole.USER, blocks=[
            TextBlock(text="What is in this image?"),
            ImageBlock(url="https://example.com/cat.png")]),
        ChatMessage(role=MessageRole.USER, blocks=[
            ImageBlock(image=b"\x89PNG" * 500, image_mimetype="image/png")]),
        ChatMessage(role=MessageRole.USER, blocks=[
            DocumentBlock(data=b"%PDF-1.4 not really", title="report.pdf")]),
        ChatMessage(role=MessageRole.USER, blocks=[
            DocumentBlock(url="https://example.com/q3.pdf")]),  # (titled "input_document")
        ChatMessage(role=MessageRole.USER, blocks=[
            ImageBlock(url=inline), TextBlock(text="And this one?")]),
        ChatMessage(role=MessageRole.USER, blocks=[  # a source to cite from: its text shown
            CitableBlock(title="Cats 101", source="https://example.com/cats",
                         content=[TextBlock(text="Cats have whiskers.")])]),
    ]
    with recording(repo):
        ThinkingLLM().chat(messages)
    run = only_run(repo)
    ((_, prompt),) = run.text("prompt", kind="llm")
    assert prompt == ("user: What is in this image?\n[image: https://example.com/cat.png]\n"
                      "user: [image: image/png]\nuser: [document: report.pdf]\n"
                      "user: [document: https://example.com/q3.pdf]\n"
                      "user: [image: image/png, 24 KB inline]\nAnd this one?\n"
                      "user: [citable: Cats 101]\nCats have whiskers.")
    ((_, response),) = run.text("response", kind="llm")
    assert response == ("[thinking: it has whiskers]\nA cat.\n[citation: Cats 101]\n"
                        "Cats have whiskers.")
    # an agent's answer is what the application shows: the text, not the thinking
    from types import SimpleNamespace

    from aim_llama import render

    output = SimpleNamespace(response=ChatMessage(role=MessageRole.ASSISTANT, blocks=[
        ThinkingBlock(content="it has whiskers"), TextBlock(text="A cat.")]))
    assert render.answer_text(output) == "A cat."
    only_image = SimpleNamespace(response=ChatMessage(role=MessageRole.ASSISTANT, blocks=[
        ImageBlock(url="https://example.com/drawn.png")]))
    assert render.answer_text(only_image) == "[image: https://example.com/drawn.png]"


def test_a_sync_only_tool_an_agent_adapts_is_one_tool_call(repo: Path) -> None:
    """An agent wraps a tool without `acall` in LlamaIndex's `BaseToolAsyncAdapter`; the
    adapter's span and the tool's own are one call: one `tool_call`, one latency, one error
    (each was recorded twice)."""
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import BaseTool, ToolMetadata, ToolOutput

    class SyncTool(BaseTool):
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        @property
        def metadata(self) -> ToolMetadata:
            return ToolMetadata(name=self.name, description="a tool with no acall")

        def __call__(self, input: Any) -> ToolOutput:
            if self.fail:
                raise ValueError("sync tool failed")
            return ToolOutput(content=f"did {input}", tool_name=self.name,
                              raw_input={"input": input}, raw_output=input)

    with recording(repo):
        for name, fail in (("synctool", False), ("badtool", True)):
            agent = FunctionAgent(tools=[SyncTool(name, fail)], llm=ScriptedToolLLM(
                tool_name=name, tool_args={"input": "x"}))
            asyncio.run(_run(agent, user_msg="go"))
    run = only_run(repo)
    for name in ("synctool", "badtool"):
        assert len(run.text("tool_call", kind="tool", tool=name)) == 1, name
        assert len(run.metric("latency_ms", kind="tool", tool=name)) == 1, name
    ((_, call),) = run.text("tool_call", kind="tool", tool="synctool")
    assert call == "synctool(input=x)\n-> did x"
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0]


def test_a_tool_whose_attribute_lookup_raises_still_has_its_inner_tool_recorded(
        repo: Path) -> None:
    """A tool whose `__getattr__` raises for unknown names (a delegating wrapper), calling
    another tool: aim-llama asks nothing of it when the inner span starts (asking for its
    `base_tool` once lost the inner tool call and made it a request of its own)."""
    from llama_index.core.tools import BaseTool, FunctionTool, ToolMetadata, ToolOutput

    inner = FunctionTool.from_defaults(fn=lambda x: f"inner {x}", name="inner")

    class Delegating(BaseTool):
        def __init__(self) -> None:
            self._options = {"name": "outer"}

        def __getattr__(self, name: str) -> Any:
            return self.__dict__["_options"][name]  # (KeyError for anything else)

        @property
        def metadata(self) -> ToolMetadata:
            return ToolMetadata(name="outer", description="delegates")

        def __call__(self, input: Any) -> ToolOutput:
            out = inner.call(x=input)
            return ToolOutput(content=f"outer({out.content})", tool_name="outer",
                              raw_input={"input": input}, raw_output=None)

    with recording(repo):
        assert Delegating()("q").content == "outer(inner q)"
        from aim_llama.autoinstrument import _active

        assert _active is not None and _active.handler.observer.handler_errors == 0
    run = only_run(repo)
    assert [t for _, t in run.text("tool_call", kind="tool", tool="inner")] == ["inner(x=q)\n-> inner q"]
    assert len(run.text("tool_call", kind="tool", tool="outer")) == 1


def test_a_callback_manager_stand_in_without_weak_references_is_followed() -> None:
    """Managers are held weakly; a stand-in that takes no weak reference (`__slots__`) is held
    instead of failing activation."""
    from aim_llama.autoinstrument import _CallbackManagers

    class Slotted:
        __slots__ = ("handlers",)

        def __init__(self) -> None:
            self.handlers: list[Any] = []

        def add_handler(self, handler: Any) -> None:
            self.handlers.append(handler)

        def remove_handler(self, handler: Any) -> None:
            self.handlers.remove(handler)

    class FakeSettings:
        def __init__(self) -> None:
            self._callback_manager: Any = Slotted()

        @property
        def callback_manager(self) -> Any:
            return self._callback_manager

    settings, handler = FakeSettings(), object()
    managers = _CallbackManagers(settings, handler)
    first = settings._callback_manager
    settings._callback_manager = second = Slotted()
    managers.follow()
    assert first.handlers == [handler] and second.handlers == [handler]
    managers.detach()
    assert first.handlers == [] and second.handlers == []


def test_react_agent(repo: Path) -> None:
    from llama_index.core.agent.workflow import ReActAgent
    from llama_index.core.tools import FunctionTool

    llm = RuleLLM()
    agent = ReActAgent(tools=[FunctionTool.from_defaults(_add, name="add")], llm=llm)
    with recording(repo):
        result = asyncio.run(_run(agent, user_msg="what is 2+3?"))
    assert "the sum is 5" in str(result)
    run = only_run(repo)
    assert llm.calls == 2
    assert_llm_steps_line_up(run, 2)
    assert [t for _, t in run.text("tool_call", kind="tool", tool="add")] == [
        "add(a=2, b=3)\n-> 5"]
    (trace,) = traces(run, "agent")
    assert trace.startswith("agent: what is 2+3?\n") and "ReActAgent.run" in trace


def test_plain_workflow_step_calling_llm(repo: Path) -> None:
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    class Poet(Workflow):
        @step
        async def write(self, ev: StartEvent) -> StopEvent:
            response = await Settings.llm.acomplete(f"write about {ev.topic}")
            return StopEvent(result=str(response))

    with recording(repo):
        result = asyncio.run(_run(Poet(), topic="llamas"))
    run = only_run(repo)
    assert_llm_steps_line_up(run, 1)
    assert "write about llamas" in run.text("prompt", kind="llm")[0][1]
    (trace,) = traces(run, "workflow")
    assert trace.startswith("workflow: llamas\n") and "Poet.write" in trace
    ((_, timed),) = run.metric("latency_ms", kind="workflow_step", step="write")
    (shown,) = re.findall(r"Poet\.write ([\d.]+)ms", trace)  # (the step's own, as shown)
    assert abs(timed - float(shown)) <= 0.05 + 1e-9, (timed, shown)
    assert [t for _, t in run.text("answer", kind="workflow")] == [result]



def test_a_workflow_that_returns_a_stream_waits_for_it(repo: Path) -> None:
    """LlamaIndex's RAG-workflow shape: the last step returns `StopEvent(result=<streaming
    response>)` and the app reads it after the run: the run's answer is the streamed text, its
    LLM call is in its trace, its latency includes the stream (sync and async streams)."""
    from llama_index.core import get_response_synthesizer
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    index = _index()

    class Rag(Workflow):
        use_async: bool = False

        @step
        async def answer(self, ev: StartEvent) -> StopEvent:
            nodes = await index.as_retriever(similarity_top_k=2).aretrieve(ev.query)
            synth = get_response_synthesizer(streaming=True, llm=RuleLLM())
            if self.use_async:
                return StopEvent(result=await synth.asynthesize(ev.query, nodes=nodes))
            return StopEvent(result=synth.synthesize(ev.query, nodes=nodes))

    async def main() -> list[str]:
        first = await Rag(timeout=30).run(query="streamed sync")
        time.sleep(0.05)  # (read later than the run ended: the latency counts it)
        texts = ["".join(first.response_gen)]
        flow = Rag(timeout=30)
        flow.use_async = True
        second = await flow.run(query="streamed async")
        texts.append("".join([d async for d in second.async_response_gen()]))
        return texts

    with recording(repo):
        streamed = asyncio.run(main())
    run = only_run(repo)
    assert all(streamed)
    assert [t for _, t in run.text("answer", kind="workflow")] == streamed
    tr = traces(run, "workflow")
    assert [t.splitlines()[0] for t in tr] == ["workflow: streamed sync", "workflow: streamed async"]
    assert all("llm calls 1" in t and "RuleLLM" in t for t in tr), tr
    assert run.metric("latency_ms", kind="workflow")[0][1] >= 50
    assert [t for _, t in run.text("response", kind="llm")] == streamed


def test_a_workflow_stream_in_a_stop_event_subclass_is_left_to_the_app(repo: Path) -> None:
    """A typed StopEvent holding the stream in a field of its own: aim-llama must not read
    the stream (dumping the event as JSON would), and the run waits for the app to read it.
    A stream that is not a generator (a plain iterator) cannot be followed: the run ends
    when it returns, without an answer, rather than staying open."""
    from llama_index.core.base.response.schema import StreamingResponse
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    class RagOutput(StopEvent):
        response: Any
        sources: int

    class Rag(Workflow):
        @step
        async def answer(self, ev: StartEvent) -> RagOutput:
            words = ["a ", "streamed ", "answer"]
            gen = iter(words) if ev.how == "iterator" else (w for w in words)
            stream = StreamingResponse(response_gen=gen)
            if ev.how == "nested":  # (one level down: not waited for, and never read either)
                return RagOutput(response={"stream": stream, "n": 1}, sources=2)
            return RagOutput(response=stream, sources=2)

    async def main() -> list[str]:
        texts = []
        for how in ("generator", "iterator", "nested"):
            out = await Rag(timeout=30).run(how=how)
            stream = out.response["stream"] if how == "nested" else out.response
            texts.append("".join(stream.response_gen))
        return texts

    with recording(repo):
        streamed = asyncio.run(main())
        Settings.llm.complete("a later span")  # (ends what could still be held)
    assert streamed == ["a streamed answer"] * 3
    run = only_run(repo)
    assert [t for _, t in run.text("answer", kind="workflow")] == ["a streamed answer"]
    statuses = [t.splitlines()[1].split(" · ")[1] for t in traces(run, "workflow")]
    assert statuses == ["ok", "ok", "ok"]
    assert len(run.metric("latency_ms", kind="workflow")) == 3


def test_failed_and_cancelled_workflow_runs_say_so_and_stay_in_step(repo: Path) -> None:
    """A run that raises or is cancelled has no answer (not its last LLM text), its trace and
    interrupted step say how it ended, every step run has a latency, and the next run's
    question, answer, latency and trace share one step again."""
    from llama_index.core.workflow import Event, StartEvent, StopEvent, Workflow, step

    class Drafted(Event):
        draft: str

    class Flaky(Workflow):
        @step
        async def draft(self, ev: StartEvent) -> Drafted:
            return Drafted(draft=str(await Settings.llm.acomplete(f"draft about {ev.topic}")))

        @step
        async def publish(self, ev: Drafted) -> StopEvent:
            if self._fail:
                raise KeyError("no publisher")
            return StopEvent(result="published")

        def __init__(self, fail: bool) -> None:
            super().__init__(timeout=30)
            self._fail = fail

    class Slow(Workflow):
        @step
        async def wait(self, ev: StartEvent) -> StopEvent:
            await asyncio.sleep(30)
            return StopEvent(result="never")

    async def main() -> None:
        with pytest.raises(KeyError):
            await Flaky(fail=True).run(topic="failing")
        handler = Slow(timeout=60).run(topic="cancelled")
        await asyncio.sleep(0.3)
        await handler.cancel_run()
        with pytest.raises(Exception) as cancelled:
            await handler
        assert "Cancel" in type(cancelled.value).__name__
        assert await Flaky(fail=False).run(topic="working") == "published"

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    questions = dict(run.text("question", kind="workflow"))
    answers = dict(run.text("answer", kind="workflow"))
    tr = dict(run.text("trace", kind="workflow"))
    assert questions == {0: "failing", 1: "cancelled", 2: "working"}
    assert answers == {2: "published"}  # the failed and the cancelled run have none
    assert sorted(dict(run.metric("latency_ms", kind="workflow"))) == [0, 1, 2]
    assert sorted(tr) == [0, 1, 2]
    assert "· error KeyError ·" in tr[0] and "Flaky.publish" in tr[0]
    assert [line.split()[-1] for line in tr[0].splitlines() if "Flaky.publish" in line] == [
        "KeyError"]
    assert "· cancelled ·" in tr[1]
    assert [line.split()[-1] for line in tr[1].splitlines() if "Slow.wait" in line] == [
        "cancelled"]
    assert "· ok ·" in tr[2]
    # the step that raised has its latency too: publish ran twice, once failing
    assert len(run.metric("latency_ms", kind="workflow_step", step="publish")) == 2
    assert len(run.metric("latency_ms", kind="workflow_step", step="wait")) == 1


def test_a_typed_start_event_is_the_question_and_a_structured_result_the_answer(
        repo: Path) -> None:
    from llama_index.core.bridge.pydantic import BaseModel
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    class Ask(StartEvent):
        query: str
        top_k: int = 3

    class Report(BaseModel):
        title: str

    class Typed(Workflow):
        @step
        async def answer(self, ev: Ask) -> StopEvent:
            await Settings.llm.acomplete(ev.query)
            return StopEvent(result=Report(title=f"on {ev.query}"))

    class Flags(Workflow):
        @step
        async def go(self, ev: StartEvent) -> StopEvent:
            return StopEvent(result="done")

    async def main() -> None:
        await Typed().run(query="typed via keywords")
        await Typed().run(start_event=Ask(query="typed start event"))
        await Flags().run(dry_run=True, retries=2)

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    assert [q for _, q in run.text("question", kind="workflow")] == [
        "typed via keywords", "typed start event", "dry_run=True, retries=2"]
    answers = [a for _, a in run.text("answer", kind="workflow")]
    assert answers[:2] == ['{"title":"on typed via keywords"}', '{"title":"on typed start event"}']
    assert [t.splitlines()[0] for t in traces(run, "workflow")][:2] == [
        "workflow: typed via keywords", "workflow: typed start event"]


async def remember(ctx: Context, fact: str) -> str:
    """Remember a fact (a tool that asks for the workflow's context)."""
    return f"remembered {fact}"


# (this module's annotations are strings; LlamaIndex looks for the Context class itself)
remember.__annotations__ = {"ctx": Context, "fact": str, "return": str}


def test_a_tools_workflow_context_argument_is_not_in_its_call_text(repo: Path) -> None:
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    llm = ScriptedToolLLM(tool_name="remember", tool_args={"fact": "llamas hum"})
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(remember, name="remember")], llm=llm)
    with recording(repo):
        asyncio.run(_run(agent, user_msg="remember this"))
    (call,) = [t for _, t in only_run(repo).text("tool_call", kind="tool", tool="remember")]
    assert call == "remember(fact=llamas hum)\n-> remembered llamas hum"



def test_workflow_inputs_and_structured_answers(repo: Path) -> None:
    """A field named `question` wins over an id; a large non-text input is named by type and
    size (never a repr of it all); structured answers with `response` / `content` fields are
    their JSON."""
    from llama_index.core.bridge.pydantic import BaseModel
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    class Ask(StartEvent):
        user_id: str
        question: str

    class Graded(BaseModel):
        response: list[str]
        score: float

    class Grader(Workflow):
        @step
        async def grade(self, ev: StartEvent) -> StopEvent:
            return StopEvent(result=Graded(response=["a", "b"], score=0.9))

    class Typed(Workflow):
        @step
        async def answer(self, ev: Ask) -> StopEvent:
            return StopEvent(result=f"about {ev.question}")

    async def main() -> None:
        await Typed().run(start_event=Ask(user_id="u-42", question="what is the refund policy?"))
        await Grader().run(documents=[Document(text=str(i)) for i in range(3000)], dry_run=True)

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    assert [q for _, q in run.text("question", kind="workflow")] == [
        "what is the refund policy?", "documents=<list of 3000>, dry_run=True"]
    assert [a for _, a in run.text("answer", kind="workflow")] == [
        "about what is the refund policy?", '{"response":["a","b"],"score":0.9}']


def test_a_query_with_an_output_class_answers_with_its_json(repo: Path) -> None:
    from llama_index.core.bridge.pydantic import BaseModel

    class Article(BaseModel):
        title: str
        content: list[str]

    class ArticleLLM(RuleLLM):
        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            from llama_index.core.llms import CompletionResponse

            return CompletionResponse(text='{"title": "Topics", "content": ["a", "b"]}')

    engine = _index().as_query_engine(similarity_top_k=2, llm=ArticleLLM(), output_cls=Article)
    with recording(repo):
        response = engine.query("list the topics")
    assert response.response == Article(title="Topics", content=["a", "b"])
    (answer,) = [a for _, a in only_run(repo).text("answer", kind="query")]
    assert answer == '{"title":"Topics","content":["a","b"]}'


def test_a_request_whose_stream_fails_as_it_is_read_failed(repo: Path) -> None:
    """The query's and the chat's own spans returned a stream; the stream raised while the
    app read it: the requests failed, with no answer (their partial text is in `response`)."""
    from llama_index.core.chat_engine import SimpleChatEngine

    with recording(repo):
        response = _index().as_query_engine(streaming=True, llm=RuleLLM(fail_after=2)).query(
            QUESTIONS[0])
        with pytest.raises(RuntimeError, match="stream broke"):
            "".join(response.response_gen)
        chat = SimpleChatEngine.from_defaults(llm=RuleLLM(fail_after=2)).stream_chat("hello")
        with pytest.raises(RuntimeError, match="stream broke"):
            "".join(chat.response_gen)
    run = only_run(repo)
    for kind in ("query", "chat"):
        (trace,) = traces(run, kind)
        assert "· error RuntimeError ·" in trace.splitlines()[1], trace
        assert not run.text("answer", kind=kind)
    assert len(run.text("response", kind="llm")) == 2
    assert all(r.endswith("[error: RuntimeError]") for _, r in run.text("response", kind="llm"))


def test_a_streamed_request_cancelled_as_it_is_read_was_cancelled(repo: Path) -> None:
    """The task reading the stream its request returned was cancelled (a timeout ran out): the
    request was cancelled — no answer, though part of the text had arrived (that part is in
    the LLM call's `response`, which ends with `[cancelled]`)."""
    engine = _index().as_query_engine(streaming=True, llm=RuleLLM(chunk_delay=0.5))

    async def main() -> None:
        two_chunks = asyncio.Event()

        async def read() -> None:
            response = await engine.aquery(QUESTIONS[0])
            seen = 0
            async for _ in response.async_response_gen():
                seen += 1
                if seen == 2:
                    two_chunks.set()

        task = asyncio.ensure_future(read())
        await two_chunks.wait()
        task.cancel()  # (what `asyncio.wait_for` does when it runs out)
        with pytest.raises(asyncio.CancelledError):
            await task

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    (trace,) = traces(run, "query")
    assert "· cancelled ·" in trace.splitlines()[1], trace
    assert not run.text("answer", kind="query")
    ((_, response),) = run.text("response", kind="llm")
    assert response.startswith("an answer") and response.endswith("[cancelled]"), response
    assert len(run.metric("latency_ms", kind="query")) == 1


def test_a_streamed_request_the_app_stopped_reading_was_abandoned(repo: Path) -> None:
    """The app read part of the stream its request returned and closed it (a client that
    went away): the request says `abandoned` and has no answer — it did not complete; what was
    read is in the LLM call's `response`, which ends with `[stream abandoned]`."""
    engine = _index().as_query_engine(streaming=True, llm=RuleLLM())

    async def read_async() -> None:
        stream = (await engine.aquery(QUESTIONS[1])).async_response_gen()
        await stream.__anext__()
        await stream.aclose()

    with recording(repo):
        stream = engine.query(QUESTIONS[0]).response_gen
        next(stream)
        stream.close()
        asyncio.run(read_async())
        engine.query(QUESTIONS[2]).get_response()  # read to the end: complete, as before
    run = only_run(repo)
    questions = dict(run.text("question", kind="query"))
    answers = dict(run.text("answer", kind="query"))
    status = {questions[step]: trace.splitlines()[1]
              for step, trace in run.text("trace", kind="query")}
    for q in QUESTIONS[:2]:
        assert "· abandoned ·" in status[q], status[q]
    assert "· ok ·" in status[QUESTIONS[2]], status
    assert [questions[s] for s in answers] == [QUESTIONS[2]]
    responses = [t for _, t in run.text("response", kind="llm")]
    assert sum(r.endswith("\n[stream abandoned]") for r in responses) == 2, responses
    assert not run.metric("errors", kind="llm") and not run.metric("errors", kind="query")
    assert len(run.metric("latency_ms", kind="query")) == 3


def test_a_workflow_result_that_cannot_be_shown_still_ends_its_request(repo: Path) -> None:
    """The answer of a result whose repr raises cannot be taken; the request must still end
    (latency, trace) at once — it stayed open until exit or the 30-minute expiry."""
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    class Handle:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    class Opaque(Workflow):
        @step
        async def go(self, ev: StartEvent) -> StopEvent:
            return StopEvent(result={"answer": "42", "handle": Handle()})

    with recording(repo):
        async def main() -> Any:
            return await Opaque(timeout=10).run(question="what?")

        result = asyncio.run(main())
        from aim_llama.autoinstrument import _active

        assert _active is not None and _active.handler.observer.open_state()["roots"] == 0
    assert result["answer"] == "42"
    run = only_run(repo)
    assert len(run.metric("latency_ms", kind="workflow")) == 1
    (trace,) = traces(run, "workflow")
    assert "incomplete" not in trace and " · ok · " in trace.splitlines()[1], trace
    assert not run.text("answer", kind="workflow")


# -- concurrency ---------------------------------------------------------------------------
def _assert_isolated(run: RunData, questions: list[str]) -> None:
    tr = traces(run, "query")
    assert len(tr) == len(questions)
    assert sorted(t.splitlines()[0] for t in tr) == sorted(f"query: {q}" for q in questions)
    for t in tr:
        assert t.count("VectorIndexRetriever.") == 1  # retrieve or aretrieve
        assert t.count("MockLLM") == 1
        assert "llm calls 1 " in t
    assert_llm_steps_line_up(run, len(questions))
    # each prompt holds exactly one of the questions
    for _, prompt in run.text("prompt", kind="llm"):
        assert sum(q in prompt for q in questions) == 1


def test_five_concurrent_asyncio_requests(repo: Path) -> None:
    engine = _index().as_query_engine(similarity_top_k=2)

    async def main() -> None:
        await asyncio.gather(*(engine.aquery(q) for q in QUESTIONS))

    with recording(repo):
        asyncio.run(main())
    _assert_isolated(only_run(repo), QUESTIONS)


def test_five_concurrent_threads(repo: Path) -> None:
    engine = _index().as_query_engine(similarity_top_k=2)
    barrier = threading.Barrier(5)

    def ask(q: str) -> None:
        barrier.wait()
        engine.query(q)

    with recording(repo):
        threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    _assert_isolated(only_run(repo), QUESTIONS)


def test_queries_under_run_jobs_or_a_user_span_are_requests_of_their_own(repo: Path) -> None:
    """LlamaIndex's `run_jobs` and a user's `@dispatcher.span` function are spans with no
    component: the queries they run are still requests, each with question, answer, latency
    and trace (the wrapper's span is not a request and gets no records of its own)."""
    from llama_index.core.async_utils import run_jobs
    from llama_index.core.instrumentation import get_dispatcher

    engine = _index().as_query_engine(similarity_top_k=2)
    dispatcher = get_dispatcher("my_app")

    @dispatcher.span
    def my_pipeline(questions: list[str]) -> list[Any]:
        return [engine.query(q) for q in questions]

    async def batch() -> None:
        await run_jobs([engine.aquery(q) for q in QUESTIONS[2:]], workers=3)

    with recording(repo):
        my_pipeline(QUESTIONS[:2])
        asyncio.run(batch())
    run = only_run(repo)
    _assert_isolated(run, QUESTIONS)
    assert sorted(t for _, t in run.text("question", kind="query")) == sorted(QUESTIONS)
    assert len(run.text("answer", kind="query")) == 5
    assert len(run.metric("latency_ms", kind="query")) == 5


# -- errors --------------------------------------------------------------------------------
def test_llm_that_raises_keeps_the_app_exception(repo: Path) -> None:
    engine = _index().as_query_engine(similarity_top_k=2, llm=FailingLLM())
    with recording(repo), pytest.raises(RuntimeError) as caught:
        engine.query("will fail")
    assert type(caught.value) is RuntimeError
    assert str(caught.value) == "backend down sk-abcdefghijklmnopqrstuvwx"
    run = only_run(repo)
    assert [v for _, v in run.metric("errors", kind="llm")] == [1.0]
    assert not run.metric("errors", kind="query")  # one exception, counted once
    assert steps(run, "prompt") == [0] and steps(run, "latency_ms") == [0]
    # nothing was read: the mark alone (it followed an empty first line)
    assert [t for _, t in run.text("response", kind="llm")] == ["[error: RuntimeError]"]
    (trace,) = traces(run, "query")
    assert "error RuntimeError" in trace
    (entry,) = _log_records(repo, run.hash)  # the run page's Logs tab
    assert entry["message"] == "llm failed: RuntimeError: backend down [REDACTED]"
    assert entry["log_level"] == "ERROR"
    assert entry["args"] == {"operation": "llm", "span": "FailingLLM.complete",
                             "exception_type": "RuntimeError", "error": "backend down [REDACTED]"}


def test_no_part_of_a_secret_reaches_the_repo_at_any_cut(repo: Path) -> None:
    """Secrets that cross a cut made on the application's thread (a node's snippet, a tool
    argument, an exception message) are redacted whole; run params and a custom pattern too;
    a tool argument that cannot be shown does not cost the request its records."""
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.schema import TextNode
    from llama_index.core.tools import FunctionTool

    aws, key, ssn = "AKIA" + "QWERTYUIOPASDFGH", "sk-" + "Zx9" * 8, "123-45-6789"

    def lookup(q: str) -> str:
        """Look something up."""
        return "found"

    def use(obj: Any) -> str:
        """Use an object."""
        return "used"

    class Unshowable:
        def __repr__(self) -> str:
            raise ValueError("no repr")

    engine = VectorStoreIndex([TextNode(text="a" * 189 + " " + aws + " rest"),
                               TextNode(text="b" * 195 + " " + ssn + " rest")]
                              ).as_query_engine(similarity_top_k=2)
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(lookup, name="lookup")],
                          llm=ScriptedToolLLM(tool_name="lookup",
                                              tool_args={"q": "x" * 489 + " " + key}))
    with recording(repo, redact=[r"\d{3}-\d{2}-\d{4}"],
                   run_params={"proxy": {"url": f"https://p/?k={key}"}}):
        engine.query("what do the documents say?")

        async def ask_agent() -> None:
            await agent.run(user_msg="go")

        asyncio.run(ask_agent())
        with pytest.raises(RuntimeError):
            FailingLLM(message="e" * 1995 + " " + key).complete("hi")
        assert FunctionTool.from_defaults(use, name="use").call(Unshowable()).content == "used"
    run = only_run(repo)
    texts: dict[str, list[str]] = {}
    for (name, _ctx), seq in run.texts.items():
        texts.setdefault(name, []).extend(t for _, t in seq)
    logs = _log_records(repo, run.hash)
    stored = repr((run.params, run.texts, logs))
    for fragment in ("AKIAQWER", "sk-Zx9", "123-45"):
        assert fragment not in stored
    (retrieved,) = texts["retrieved"]
    assert "a [REDACTED]" in retrieved and "b [REDACTED]" in retrieved
    assert any('x [REDACTED]…' in t for t in texts["tool_call"])
    assert "use(<Unshowable object>)\n-> used" in texts["tool_call"]
    assert not run.metric("handler_errors", kind="dispatcher")
    (entry,) = logs
    assert entry["args"]["error"].endswith(f"e [REDACTED]… [truncated {1996 + len(key) - 2000} chars]")
    assert entry["message"] == "llm failed: RuntimeError: " + entry["args"]["error"]
    assert run.params["proxy"] == {"url": "https://p/?k=[REDACTED]"}


def test_a_cancelled_llm_call_is_recorded_as_cancelled_not_as_an_error(repo: Path) -> None:
    llm = SlowLLM(delay=5.0)

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(llm.acomplete("are you there?"), 0.2)  # the app gives up

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    assert not run.metric("errors", kind="llm")
    assert _log_records(repo, run.hash) == []
    assert [t for _, t in run.text("prompt", kind="llm")] == ["are you there?"]
    assert [t for _, t in run.text("response", kind="llm")] == ["[cancelled]"]
    ((_, latency),) = run.metric("latency_ms", kind="llm")
    assert 150 < latency < 5000  # the time until the cancellation, not the LLM's 5 s


def _log_records(repo: Path, run_hash: str) -> list[dict[str, Any]]:
    from aim import Repo

    run = Repo.from_path(str(repo)).get_run(run_hash)  # already indexed by read_run
    seq = run.get_log_records()
    if seq is None:
        return []
    _steps, (values, *_rest) = seq.data.items_list()
    return [(v[0] if isinstance(v, list) else v).json() for v in values]


def test_instrumenting_after_the_engine_was_built(repo: Path) -> None:
    engine = _index().as_query_engine(similarity_top_k=2)  # built before any handler exists
    engine.query("before")
    with recording(repo):
        engine.query("after")
    run = only_run(repo)
    assert_llm_steps_line_up(run, 1)
    assert "Query: after" in run.text("prompt", kind="llm")[0][1]
    assert [t.splitlines()[0] for t in traces(run, "query")] == ["query: after"]


# -- content controls ----------------------------------------------------------------------
def test_capture_content_false_keeps_structure_and_metrics(repo: Path) -> None:
    engine = _index().as_query_engine(similarity_top_k=2)
    with recording(repo, capture_content=False):
        engine.query("secret question")
    run = only_run(repo)
    names = {name for name, _ in run.texts}
    assert names == {"trace"}, names
    (trace,) = traces(run, "query")
    assert "secret question" not in trace and trace.startswith("query: [content not captured]")
    assert steps(run, "latency_ms") == [0]
    assert steps(run, "total_tokens", source="estimated") == [0]


def test_redaction_truncation_and_default_secrets(repo: Path) -> None:
    aws = "AKIA" + "ABCDEFGHIJKLMNOP"
    # (the shortest bearer token the pattern takes: 8 characters)
    question = (f"my key is sk-{'a1' * 12} and {aws}, Bearer abc.def.ghi123, bearer abcdefgh, "
                "ssn 123-45-6789 " + "x" * 500)
    engine = _index().as_query_engine(similarity_top_k=2)
    with recording(repo, redact=[r"\d{3}-\d{2}-\d{4}"], max_text_length=200):
        engine.query(question)
    run = only_run(repo)
    texts = [t for seq in run.texts.values() for _, t in seq]
    joined = "\n".join(texts)
    for secret in ("sk-a1a1", aws, "abc.def.ghi123", "abcdefgh", "123-45-6789"):
        assert secret not in joined, secret
    q = run.text("question", kind="query")[0][1]
    assert q.startswith("my key is [REDACTED] and [REDACTED], [REDACTED], [REDACTED], "
                        "ssn [REDACTED] ")
    assert q.endswith(f"… [truncated {len(question) - 200} chars]")
    assert "[truncated" in run.text("prompt", kind="llm")[0][1]


def test_each_cut_falls_where_the_readme_says(repo: Path) -> None:
    """A text of exactly a limit is kept whole; one character more is cut at the limit:
    `max_text_length` (then `… [truncated N chars]`), the trace's first line (300, `…`), a
    retrieved node's snippet (200, no mark) and a tool argument, positional or keyword (500,
    `…`)."""
    from llama_index.core.tools import FunctionTool

    def echo(q: str) -> str:
        """Says ok."""
        return "ok"

    tool = FunctionTool.from_defaults(echo, name="echo")
    index = VectorStoreIndex.from_documents([Document(text="y" * 201), Document(text="z" * 200)])
    engine = index.as_query_engine(similarity_top_k=2)
    asked = ["w" * 300, "w" * 301, "v" * 1000, "v" * 1001]
    with recording(repo, max_text_length=1000):
        for q in asked:
            engine.query(q)
        tool.call("p" * 500)
        tool.call("p" * 501)
        tool.call(q="k" * 500)
        tool.call(q="k" * 501)
    run = only_run(repo)
    assert [t for _, t in run.text("question", kind="query")] == [
        asked[0], asked[1], asked[2], "v" * 1000 + "… [truncated 1 chars]"]
    first_lines = [t.split("\n", 1)[0] for t in traces(run, "query")]
    assert first_lines == ["query: " + "w" * 300] + ["query: " + c * 300 + "…" for c in "wvv"]
    for _, text in run.text("retrieved", **RETRIEVE):
        snippets = sorted(line.rsplit(" | ", 1)[1] for line in text.splitlines()[1:])
        assert snippets == ["y" * 200, "z" * 200], text
    calls = [t.split("\n", 1)[0] for _, t in run.text("tool_call", kind="tool", tool="echo")]
    assert calls == ["echo(" + "p" * 500 + ")", "echo(" + "p" * 500 + "…)",
                     "echo(q=" + "k" * 500 + ")", "echo(q=" + "k" * 500 + "…)"]


def test_sample_rate_zero_keeps_counters(repo: Path) -> None:
    engine = _index().as_query_engine(similarity_top_k=2)
    with recording(repo, sample_rate=0.0):
        for q in QUESTIONS[:3]:
            engine.query(q)
    run = only_run(repo)
    assert not run.texts  # no request was sampled: no text at all
    assert steps(run, "latency_ms") == [0, 1, 2]
    assert steps(run, "total_tokens", source="estimated") == [0, 1, 2]
    assert len(run.metric("retrieved_nodes", **RETRIEVE)) == 3


def test_sample_rate_half_samples_whole_requests(repo: Path) -> None:
    """About half the requests keep their texts; a sampled request keeps all of them (question,
    prompt, retrieved nodes, answer, trace), an unsampled one none; every request is counted."""
    engine = _index().as_query_engine(similarity_top_k=2)
    with recording(repo, sample_rate=0.5):
        for i in range(40):
            engine.query(f"question number {i}")
    run = only_run(repo)
    questions = [t for _, t in run.text("question", kind="query")]
    assert 6 <= len(questions) <= 34, len(questions)  # Binomial(40, 0.5): outside, p < 1e-5
    asked = {q.rsplit(" ", 1)[1] for q in questions}
    prompted = {re.search(r"question number (\d+)", t).group(1)  # type: ignore[union-attr]
                for _, t in run.text("prompt", kind="llm")}
    assert prompted == asked
    for name, ctx in (("answer", {"kind": "query"}), ("retrieved", RETRIEVE),
                      ("trace", {"kind": "query"})):
        assert len(run.text(name, **ctx)) == len(questions), name
    assert len(run.metric("latency_ms", kind="query")) == 40
    assert len(run.metric("latency_ms", kind="llm")) == 40


def test_a_low_sample_rate_keeps_few_requests_texts(repo: Path) -> None:
    """The rate is the share of requests kept, not of those left out."""
    engine = _index().as_query_engine(similarity_top_k=2)
    with recording(repo, sample_rate=0.1):
        for i in range(60):
            engine.query(f"question number {i}")
    run = only_run(repo)
    kept = len(run.text("question", kind="query"))
    assert kept <= 20, kept  # Binomial(60, 0.1): above 20, p < 1e-6
    assert len(run.metric("latency_ms", kind="query")) == 60


def test_ignore_lists_suppress_dispatcher_data(repo: Path) -> None:
    engine = _index().as_query_engine(similarity_top_k=2)
    # (RuleLLM: MockLLM's last streamed chunk lags its deltas by one word)
    streaming = _index().as_query_engine(similarity_top_k=2, streaming=True, llm=RuleLLM())
    with recording(repo, event_ends_to_ignore=["llm"], event_starts_to_ignore=["retrieve"]):
        engine.query("ignored")
        streamed = "".join(streaming.query("streamed").response_gen)
    run = only_run(repo)
    assert not run.text("prompt", kind="llm") and not run.metric("latency_ms", kind="llm")
    assert not any(name == "llm_models" for name in run.params)
    assert not any(name == "retrieved_nodes" for name, _ in run.sequences())
    assert run.metric("embedded_texts", kind="embedding")  # the rest still lands
    assert len(traces(run, "query")) == 2
    # ignoring `llm` keeps the requests' own records, a streamed answer included
    assert [t for _, t in run.text("question", kind="query")] == ["ignored", "streamed"]
    answers = [t for _, t in run.text("answer", kind="query")]
    assert len(answers) == 2 and answers[1] == streamed and streamed


def test_an_ignored_llm_still_has_its_failures_counted(repo: Path) -> None:
    """Ignoring `llm` drops the call records, not the `errors` it caused (`exception` does)."""
    with recording(repo, event_ends_to_ignore=["llm"]), pytest.raises(RuntimeError):
        FailingLLM().complete("fail, unrecorded")
    run = only_run(repo)
    assert not run.text("prompt", kind="llm")
    assert [v for _, v in run.metric("errors", kind="llm")] == [1.0]


def test_a_failure_inside_the_observer_is_contained_logged_once_and_counted(
    repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from aim_llama import observer as observer_module
    from aim_llama.log import reset_reported

    def broken(self: Any, node: Any, bound_args: Any, now: float) -> Any:
        raise RuntimeError("observer bug")

    reset_reported()
    caplog.set_level(logging.WARNING, logger="aim_llama")
    engine = _index().as_query_engine(similarity_top_k=2)
    with recording(repo):
        monkeypatch.setattr(observer_module.Observer, "_new_root", broken)
        answers = [str(engine.query(q)) for q in QUESTIONS[:3]]
        monkeypatch.undo()
    assert all(answers)  # the application got its answers
    logged = [r for r in caplog.records if "could not record a LlamaIndex span start" in r.message]
    assert len(logged) == 1, [r.message for r in caplog.records]
    run = only_run(repo)
    counts = [v for _, v in run.metric("handler_errors", kind="dispatcher")]
    # every span of a query without a root fails to attach: at least one failure per query
    assert len(counts) >= 3 and counts == sorted(counts) and counts[-1] == len(counts)


def test_a_failure_recording_an_llm_call_does_not_hold_up_its_request(
    repo: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aim_llama import render

    def broken(response: Any) -> str:
        raise RuntimeError("observer bug")

    engine = _index().as_query_engine(similarity_top_k=2)
    with recording(repo):
        monkeypatch.setattr(render, "render_response", broken)
        answers = [str(engine.query(q)) for q in QUESTIONS[:3]]
        monkeypatch.undo()
    assert all(answers)
    run = only_run(repo)
    assert [v for _, v in run.metric("handler_errors", kind="dispatcher")] == [1.0, 2.0, 3.0]
    # each request is complete when its query returns, not left waiting for an LLM call whose
    # records failed (it would be written as incomplete at the end, or expire after 30 min)
    assert [t for _, t in run.text("question", kind="query")] == QUESTIONS[:3]
    assert len(traces(run, "query")) == 3
    for trace in traces(run, "query"):
        assert " ok " in trace.splitlines()[1] and "incomplete" not in trace, trace


def test_callback_types_recorded_elsewhere_are_never_delivered(
    repo: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aim_llama.handler import AimLlamaHandler

    seen: list[tuple[str, str]] = []
    start, end = AimLlamaHandler.on_event_start, AimLlamaHandler.on_event_end

    def on_start(self: Any, event_type: Any, *a: Any, **k: Any) -> Any:
        seen.append(("start", event_type.value))
        return start(self, event_type, *a, **k)

    def on_end(self: Any, event_type: Any, *a: Any, **k: Any) -> Any:
        seen.append(("end", event_type.value))
        return end(self, event_type, *a, **k)

    monkeypatch.setattr(AimLlamaHandler, "on_event_start", on_start)
    monkeypatch.setattr(AimLlamaHandler, "on_event_end", on_end)
    engine = _index().as_query_engine(similarity_top_k=2)
    with recording(repo):
        seen.clear()
        engine.query(QUESTIONS[0])
    # LlamaIndex filters with the handler's ignore lists: only synthesize and the
    # synthesizer's re-chunking reach the callback handler during a query
    assert {kind for _, kind in seen} == {"synthesize", "chunking"}, seen
    assert ("start", "chunking") not in seen
    run = only_run(repo)
    assert len(run.metric("latency_ms", kind="synthesize")) == 1
    assert len(run.text("prompt", kind="llm")) == 1  # the dispatcher still records the LLM call


# -- registration and bounded state ------------------------------------------------------
def test_registration_is_idempotent_and_state_is_freed(repo: Path) -> None:
    from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]

    from aim_llama.dispatcher import AimEventHandler, AimSpanHandler

    def counts() -> tuple[int, int]:
        d = get_dispatcher()
        return (sum(isinstance(h, AimSpanHandler) for h in d.span_handlers),
                sum(isinstance(h, AimEventHandler) for h in d.event_handlers))

    engine = _index().as_query_engine(similarity_top_k=2)
    with recording(repo):
        aim_llama.instrument()
        aim_llama.instrument(repo=str(repo))
        assert counts() == (1, 1)
        engine.query("one")
        from aim_llama.autoinstrument import _active

        observer = _active.handler.observer  # type: ignore[union-attr]
        assert observer.open_state() == {"spans": 0, "roots": 0, "calls": 0, "timed": 0}
    assert counts() == (0, 0)


def test_abandoned_stream_expires(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aim_llama import observer as observer_module

    engine = _index().as_query_engine(similarity_top_k=2, streaming=True)
    retriever = _index().as_retriever()
    with recording(repo):
        from aim_llama.autoinstrument import _active

        observer = _active.handler.observer  # type: ignore[union-attr]
        kept = engine.query("never consumed")  # a StreamingResponse kept, never read
        assert observer.open_state()["roots"] == 1  # waiting for its stream
        monkeypatch.setattr(observer_module, "ROOT_TTL", 0.2)
        monkeypatch.setattr(observer_module, "SWEEP_INTERVAL", 0.0)
        observer._next_sweep = 0.0
        time.sleep(0.3)
        retriever.retrieve("later request")  # the next request's spans sweep
        assert observer.open_state() == {"spans": 0, "roots": 0, "calls": 0, "timed": 0}
    run = only_run(repo)
    expired = [t for t in traces(run, "query") if t.startswith("query: never consumed")]
    assert len(expired) == 1 and "expired" in expired[0]
    del kept


def test_a_long_async_embedding_batch_outlives_the_request_ttl(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An async batch sends every batch's start before the first end; other requests sweep
    meanwhile. The starts wait for their ends however long that takes (ROOT_TTL scaled down)."""
    from llama_index.core.base.embeddings.base import BaseEmbedding

    from aim_llama import observer as observer_module

    class SlowBatches(BaseEmbedding):
        def _get_query_embedding(self, query: str) -> list[float]:
            return [1.0, 0.0]

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return [1.0, 0.0]

        def _get_text_embedding(self, text: str) -> list[float]:
            return [1.0, 0.0]

        async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            await asyncio.sleep(0.8)
            return [[1.0, 0.0] for _ in texts]

    monkeypatch.setattr(observer_module, "ROOT_TTL", 0.3)
    monkeypatch.setattr(observer_module, "SWEEP_INTERVAL", 0.0)

    async def main() -> None:
        async def other_traffic() -> None:
            for _ in range(6):
                await asyncio.sleep(0.15)
                await Settings.llm.acomplete("ping")

        await asyncio.gather(SlowBatches(embed_batch_size=2).aget_text_embedding_batch(
            [f"text {i}" for i in range(6)]), other_traffic())

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    assert [v for _, v in run.metric("embedded_texts", kind="embedding")] == [2.0, 2.0, 2.0]
    assert all(v >= 800 for _, v in run.metric("latency_ms", kind="embedding"))


def test_auto_import_subprocess_with_process_writer(run_py: Any, repo: Path) -> None:
    """`import aim_llama.auto` in a real program: both channels feed the writer process."""
    proc = run_py(script=APPS / "rag.py", args=["3", "--print-hash"])
    run_hash = proc.stdout.split("RUN ", 1)[1].split()[0]
    run = read_run(repo, run_hash)
    assert run.end_time is not None and not run.active
    assert_llm_steps_line_up(run, 3)
    tr = traces(run, "query")
    assert [t.splitlines()[0] for t in tr] == [
        f"query: question {i}: what about topic {i % 3}?" for i in range(3)]
    chunks = [t for _, t in run.text("chunk", kind="chunking")]  # the CallbackManager channel
    assert chunks[:6] == [f"Document number {i} talks about topic {i % 3}." for i in range(6)]
    assert run.metric("embedded_texts", kind="embedding")[0] == (0, 6.0)


# -- found by a review of less common shapes (2026-11-26, third session) -----------------------

def test_a_synthesizer_failure_is_one_error_though_both_channels_see_it(repo: Path) -> None:
    # A query longer than the LLM's context: the response synthesizer raises before any LLM
    # call. The exception reaches the callback channel (the SYNTHESIZE event's payload) and
    # the dispatcher (the failing spans): one exception, one `errors` point, one Logs entry.
    engine = _index().as_query_engine(similarity_top_k=2)
    with recording(repo), pytest.raises(ValueError, match="context size"):
        engine.query("tell me " * 5000)
    run = only_run(repo)
    assert run.metric("errors", kind="synthesize") == [(0, 1.0)]
    assert not run.metric("errors", kind="query")
    logs = _log_records(repo, run.hash)
    assert len(logs) == 1 and "synthesize failed: ValueError" in str(logs[0]), logs
    assert "error ValueError" in traces(run, "query")[0]


def test_ignoring_exception_events_records_no_error_from_either_channel(repo: Path) -> None:
    engine = _index().as_query_engine(similarity_top_k=2)
    with recording(repo, event_ends_to_ignore=["exception"]), pytest.raises(ValueError):
        engine.query("tell me " * 5000)
    run = only_run(repo)
    assert not [k for k in run.metrics if k[0] == "errors"], run.metrics.keys()
    assert _log_records(repo, run.hash) == []
    assert "error ValueError" in traces(run, "query")[0]  # the trace still says how it ended


class _TwoToolsAtOnce(ScriptedToolLLM):
    """Asks for the tools `alpha` and `beta` in one answer, then answers `done`."""

    def _respond(self, messages: Any) -> Any:
        from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole

        self.calls += 1
        if messages and messages[-1].role == MessageRole.TOOL:
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content="done"))
        calls = [{"id": f"call_{n}", "type": "function",
                  "function": {"name": n, "arguments": '{"x": 1}'}} for n in ("alpha", "beta")]
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content="",
                                                additional_kwargs={"tool_calls": calls}))


def test_two_tools_that_fail_at_the_same_time_are_two_errors(repo: Path) -> None:
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    async def alpha(x: int) -> str:
        """Tool alpha."""
        await asyncio.sleep(0.05)
        raise ValueError("alpha broke")

    async def beta(x: int) -> str:
        """Tool beta (fails while alpha's failure is already counted)."""
        await asyncio.sleep(0.15)
        raise KeyError("beta broke")

    agent = FunctionAgent(tools=[FunctionTool.from_defaults(async_fn=alpha, name="alpha"),
                                 FunctionTool.from_defaults(async_fn=beta, name="beta")],
                          llm=_TwoToolsAtOnce())
    async def main() -> Any:
        return await agent.run(user_msg="use both tools")

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    assert len(run.metric("errors", kind="tool")) == 2
    messages = sorted(str(entry) for entry in _log_records(repo, run.hash))
    assert len(messages) == 2 and "alpha broke" in messages[1] and "beta broke" in messages[0], \
        messages


def _history_written_before_stream_chat_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force what a preempted caller sees: a chat engine's history thread (which reads the
    LLM stream) runs to its end before `stream_chat` returns."""
    import llama_index.core.chat_engine.simple as simple

    class DoneBeforeReturn(simple.Thread):
        def start(self) -> None:
            super().start()
            self.join()

    monkeypatch.setattr(simple, "Thread", DoneBeforeReturn)


def test_a_tool_whose_own_llm_call_failed_is_still_one_error(repo: Path) -> None:
    # (what the per-tool count is for: the tool fails because of the error under it)
    from llama_index.core.tools import FunctionTool

    inner = FailingLLM()

    def ask(q: str) -> str:
        """Asks a failing LLM."""
        try:
            return inner.complete(q).text
        except Exception as exc:
            raise RuntimeError("the tool gave up") from exc

    tool = FunctionTool.from_defaults(ask, name="ask")
    with recording(repo), pytest.raises(RuntimeError, match="gave up"):
        tool.call(q="hello")
    run = only_run(repo)
    assert len(run.metric("errors", kind="llm")) == 1
    assert not run.metric("errors", kind="tool")


def test_a_streaming_chat_read_by_llamaindex_before_it_returns_still_ends(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chat engine's `stream_chat` reads its LLM stream in a thread of LlamaIndex's; when
    that thread is done before `stream_chat` returns (a preempted caller; forced here), the
    chat response's `response_gen` is still an unstarted generator — a property that makes
    a new one each time. The request must not wait for it: it stayed open until shutdown."""
    from llama_index.core.chat_engine import SimpleChatEngine

    _history_written_before_stream_chat_returns(monkeypatch)
    with recording(repo):
        response = SimpleChatEngine.from_defaults(llm=MockLLM(max_tokens=4)).stream_chat("hi")
        read = "".join(response.response_gen)
        time.sleep(0.1)
        from aim_llama.autoinstrument import _active

        assert _active is not None and _active.handler.observer.open_state()["roots"] == 0
    run = only_run(repo)
    assert [a for _, a in run.text("answer", kind="chat")] == [read]
    (trace,) = traces(run, "chat")
    assert "incomplete" not in trace and " ok " in trace.splitlines()[1], trace


def test_a_streaming_chat_does_not_take_the_callers_next_stream(repo: Path) -> None:
    # condense_question's stream_chat returns a response LlamaIndex reads in its own thread;
    # an unrelated stream the caller opens meanwhile is a request of its own.
    index = _index()
    engine = index.as_chat_engine(chat_mode="condense_question", llm=RuleLLM(first_delay=0.2))
    other = RuleLLM()
    with recording(repo):
        response = engine.stream_chat("hello chat")
        unrelated = "".join(c.delta or "" for c in other.stream_complete("UNRELATED title"))
        answer = "".join(response.response_gen)
        deadline = time.monotonic() + 10
        while not response.is_done and time.monotonic() < deadline:
            time.sleep(0.01)
    assert unrelated and answer
    run = only_run(repo)
    (chat,) = traces(run, "chat")
    assert "llm calls 1 " in chat and "UNRELATED" not in chat, chat
    prompts = [t for _, t in run.text("prompt", kind="llm")]
    assert len(prompts) == 2 and "UNRELATED title" in prompts


def test_tool_calls_carried_as_blocks_are_shown(repo: Path) -> None:
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.base.llms.types import ToolCallBlock
    from llama_index.core.llms import ChatMessage
    from llama_index.core.llms.mock import MockFunctionCallingLLM
    from llama_index.core.tools import FunctionTool

    def ping(host: str = "example.org") -> str:
        """Ping a host."""
        return f"pong from {host}"

    llm = MockFunctionCallingLLM()
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(ping, name="ping")], llm=llm)
    reply = ChatMessage(role="assistant", blocks=[ToolCallBlock(
        tool_call_id="c1", tool_name="ping", tool_kwargs={"host": "a.b"})])
    async def main() -> Any:
        return await agent.run(user_msg="ping something")

    with recording(repo):
        asyncio.run(main())
        llm.response_generator = lambda messages, **kw: reply
        llm.chat([ChatMessage(role="user", content="call ping on a.b")])
    run = only_run(repo)
    prompts = [t for _, t in run.text("prompt", kind="llm")]
    responses = [t for _, t in run.text("response", kind="llm")]
    assert prompts[0].endswith("[tools: ping]"), prompts[0]
    assert "0x" not in "".join(prompts)
    assert 'tool_call: ping({"host": "example.org"})' in prompts[1], prompts[1]
    assert responses[0] == 'tool_call: ping({"host": "example.org"})', responses
    assert responses[-1] == 'tool_call: ping({"host": "a.b"})', responses


@pytest.mark.parametrize("wrapper", ["the application's own span", "a tool called directly"])
def test_a_streaming_query_read_inside_a_wrapper_keeps_its_llm_call(repo: Path,
                                                                      wrapper: str) -> None:
    """A streaming query read inside an enclosing span (a web handler decorated with
    `@dispatcher.span`, a `QueryEngineTool` called directly) lost its LLM call from its
    trace: the stream's span had a live parent, the wrapper's, so the call went there."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.tools import QueryEngineTool

    engine = _index().as_query_engine(similarity_top_k=2, streaming=True)
    dispatcher = get_dispatcher("tests.wrapper")

    @dispatcher.span
    def handle(question: str) -> str:
        return "".join(engine.query(question).response_gen)

    with recording(repo):
        if wrapper == "a tool called directly":
            tool = QueryEngineTool.from_defaults(engine, name="docs", description="the docs")
            answer = str(tool.call(input=QUESTIONS[0]))
        else:
            answer = handle(QUESTIONS[0])
    run = only_run(repo)
    assert [t for _, t in run.text("answer", kind="query")] == [answer]
    (trace,) = traces(run, "query")
    assert "llm calls 1" in trace.splitlines()[1] and "stream llm" in trace, trace
    (llm_step,) = steps(run, "latency_ms")
    assert steps(run, "prompt_tokens", source="estimated") == [llm_step]


def test_a_failed_retrieval_and_a_failed_embedding_still_have_their_latency(repo: Path) -> None:
    """Their `latency_ms` came only from the end events, which LlamaIndex does not send
    when the call raises: a 50 ms failure left no point (a failed LLM call or tool has one)."""
    from llama_index.core.retrievers import BaseRetriever

    class ShardMissing(BaseRetriever):
        def _retrieve(self, query_bundle: Any) -> list[Any]:
            time.sleep(0.05)
            raise KeyError("shard missing")

    class TimingOut(MockEmbedding):
        def _get_query_embedding(self, query: str) -> list[float]:
            time.sleep(0.05)
            if "boom" in query:
                raise TimeoutError("embedding timed out")
            return super()._get_query_embedding(query)

    index = _index()
    engine = index.as_query_engine(embed_model=TimingOut(embed_dim=8))
    with recording(repo):
        with pytest.raises(KeyError):
            ShardMissing().retrieve("a")
        with pytest.raises(TimeoutError):
            engine.query("boom")
        engine.query("fine")
    run = only_run(repo)
    ((_, failed),) = run.metric("latency_ms", kind="retrieve", retriever="ShardMissing")
    assert 50 <= failed < 5000
    assert not run.metric("retrieved_nodes", kind="retrieve", retriever="ShardMissing")
    # the vector retriever's failed embedding (step 0: its latency only), then the good
    # query's (step 1: all its values)
    embeddings = run.metric("latency_ms", kind="embedding")
    assert [s for s, _ in embeddings] == [0, 1]
    assert all(50 <= v < 5000 for _, v in embeddings), embeddings
    assert steps(run, "embedded_texts", kind="embedding") == [1]
    assert steps(run, "embedding_tokens", kind="embedding", source="estimated") == [1]
    assert [v for _, v in run.metric("errors", kind="embedding")] == [1.0]
    assert [v for _, v in run.metric("errors", kind="retrieve")] == [1.0]
    # the vector retriever's failed retrieval (its embedding failed) is its step 0, with a
    # latency only; the good query's is step 1, all its values there
    assert steps(run, "latency_ms", **RETRIEVE) == [0, 1]
    assert steps(run, "retrieved_nodes", **RETRIEVE) == steps(run, "top_score", **RETRIEVE) == [1]


def test_a_full_trace_counts_what_it_leaves_out_and_puts_no_call_on_the_wrong_line(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the cap, the same LLM's inner call under an unlisted `acomplete` (MockLLM's
    `acomplete` → `complete`) was counted as another span not listed, and the unlisted calls'
    `llm …ms tokens=…` notes were written on the line above them (the step's)."""
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    from aim_llama import observer

    monkeypatch.setattr(observer, "MAX_TRACE_NODES", 8)
    llm = MockLLM(max_tokens=2)

    class Loop(Workflow):
        @step
        async def work(self, ev: StartEvent) -> StopEvent:
            for i in range(12):
                await llm.acomplete(f"call {i}")
            return StopEvent(result="done")

    Loop.work.__annotations__.update(ev=StartEvent, **{"return": StopEvent})

    async def main() -> Any:
        return await Loop(timeout=30).run()

    with recording(repo):
        assert asyncio.run(main()) == "done"
    (trace,) = traces(only_run(repo), "workflow")
    lines = trace.splitlines()
    assert "llm calls 12" in lines[1], trace
    listed = lines[2:-1]
    assert len(listed) == 8, trace
    # the run, its step and 12 `acomplete`: 14 spans, 8 listed
    assert lines[-1] == "… 6 more spans not listed", trace
    assert all((" llm " in line) == ("acomplete" in line) for line in listed), trace


@pytest.mark.parametrize(("tools", "message"), [("recorded", ""), ("ignored", ""),
                                                ("recorded", "first\n\nsecond")])
def test_predict_and_call_failing_on_a_tools_error_is_one_error(repo: Path, tools: str,
                                                                message: str) -> None:
    """`predict_and_call(error_on_tool_error=True)` re-raises the tool's failure as a new
    ValueError from the LLM's span: it was counted twice, once as an LLM failure (also
    when the tool's message holds a blank line, as the outputs are joined by one). With
    tools ignored (`function_call`) the failure is still one error (`exception` is not)."""
    from llama_index.core.tools import FunctionTool

    def divide(a: int, b: int) -> float:
        """Divide a by b."""
        if message:
            raise ZeroDivisionError(message)
        return a / b

    llm = ScriptedToolLLM(tool_name="divide", tool_args={"a": 1, "b": 0})
    ignore = {"event_starts_to_ignore": ["function_call"]} if tools == "ignored" else {}
    with recording(repo, **ignore), pytest.raises(ValueError, match=message or "by zero"):
        llm.predict_and_call([FunctionTool.from_defaults(divide)], user_msg="1/0?",
                             error_on_tool_error=True)
    run = only_run(repo)
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0]
    assert not run.metric("errors", kind="llm")
    (entry,) = _log_records(repo, run.hash)
    assert entry["args"]["exception_type"] == "ZeroDivisionError"
    assert bool(run.text("tool_call", kind="tool", tool="divide")) == (tools == "recorded")


def test_a_tool_failing_after_an_inner_tools_error_output_is_its_own_error(repo: Path) -> None:
    from llama_index.core.tools import FunctionTool, ToolOutput

    def lookup(a: int) -> int:
        """Look a up."""
        return a

    inner = FunctionTool.from_defaults(lookup, callback=lambda out: ToolOutput(
        content="inner boom", tool_name="lookup", raw_input={}, raw_output=None, is_error=True))

    def outer(a: int) -> int:
        """Use lookup, then fail for a reason of its own."""
        inner.call(a=a)
        raise KeyError("outer broke for its own reason")

    with recording(repo), pytest.raises(KeyError):
        FunctionTool.from_defaults(outer, name="outer").call(a=1)
    run = only_run(repo)
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0, 1.0]
    assert sorted(e["args"]["span"] for e in _log_records(repo, run.hash)) == ["lookup", "outer"]


@pytest.mark.parametrize("tools", ["recorded", "ignored"])
@pytest.mark.parametrize("how", ["called directly", "under predict_and_call"])
def test_a_tool_returning_an_error_is_one_error(repo: Path, tools: str, how: str) -> None:
    """An error output (no exception) is an error, also while tools are ignored; and
    predict_and_call's ValueError made of it is not another one."""
    from llama_index.core.tools import FunctionTool, ToolOutput

    def lookup(a: int) -> int:
        """Look a up."""
        return a

    tool = FunctionTool.from_defaults(lookup, callback=lambda out: ToolOutput(
        content="boom", tool_name="lookup", raw_input={}, raw_output=None, is_error=True))
    ignore = {"event_starts_to_ignore": ["function_call"]} if tools == "ignored" else {}
    with recording(repo, **ignore):
        if how == "called directly":
            tool.call(a=1)
        else:
            with pytest.raises(ValueError, match="boom"):
                ScriptedToolLLM(tool_name="lookup", tool_args={"a": 1}).predict_and_call(
                    [tool], user_msg="look 1 up", error_on_tool_error=True)
    run = only_run(repo)
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0]
    assert not run.metric("errors", kind="llm")
    assert len(_log_records(repo, run.hash)) == 1
    assert bool(run.text("tool_call", kind="tool", tool="lookup")) == (tools == "recorded")


def test_an_llm_failure_quoting_a_tools_error_is_an_error_of_its_own(repo: Path) -> None:
    """Only `predict_and_call`'s own re-raise is the tool's error again: a parse failure of
    a model that quotes LlamaIndex's "Encountered error: …" (here after a tool failed with
    an empty message, which every text contains) is a failure of its own."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools import FunctionTool
    from pydantic import BaseModel

    class Answer(BaseModel):
        city: str

    def lookup(city: str) -> str:
        """Look a city up."""
        raise TimeoutError()

    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback

    class Apologetic(CustomLLM):
        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(model_name="apologetic")

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            return CompletionResponse(text="Sorry. Encountered error: the lookup timed out.")

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            raise NotImplementedError

    tool = FunctionTool.from_defaults(lookup)
    llm = Apologetic()
    dispatcher = get_dispatcher("tests.quoting")

    @dispatcher.span
    def handle() -> None:
        with contextlib.suppress(TimeoutError):
            tool.call(city="x")
        llm.structured_predict(Answer, PromptTemplate("which city? {q}"), q="?")

    with recording(repo), pytest.raises(ValueError):
        handle()
    run = only_run(repo)
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0]
    assert [v for _, v in run.metric("errors", kind="llm")] == [1.0]


# -- Edges no test pinned before a mutation audit of the observer (2026-11-28): an error counted
# once whichever way it travels, cancellation that is no error, requests cut off by shutdown,
# rough token counts marked, the open-request cap.


# (LlamaIndex's history thread dies of the stream's error, with or without aim-llama)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_chat_stream_failing_before_stream_chat_returns_fails_its_request(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LlamaIndex's history thread read the chat's stream, which raised, before `stream_chat`
    returned (a preempted caller; forced here): the chat failed, with no answer."""
    from llama_index.core.chat_engine import SimpleChatEngine

    _history_written_before_stream_chat_returns(monkeypatch)
    with recording(repo):
        chat = SimpleChatEngine.from_defaults(llm=RuleLLM(fail_after=2)).stream_chat("hello")
        with pytest.raises(RuntimeError, match="stream broke"):
            "".join(chat.response_gen)
    run = only_run(repo)
    (trace,) = traces(run, "chat")
    assert "· error RuntimeError ·" in trace.splitlines()[1], trace
    assert not run.text("answer", kind="chat")


def test_a_cancelled_tool_call_says_cancelled_and_is_no_error(repo: Path) -> None:
    """README: a cancelled tool is recorded as cancelled, not as an error: its `tool_call`
    ends `-> cancelled`."""

    from llama_index.core.tools import FunctionTool

    async def slow_lookup(city: str) -> str:
        await asyncio.sleep(5)
        return f"{city}: sunny"

    tool = FunctionTool.from_defaults(async_fn=slow_lookup, name="slow_lookup")

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(tool.acall(city="Oslo"), 0.2)  # the app gives up

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    ((_, call),) = run.text("tool_call", kind="tool", tool="slow_lookup")
    assert call == "slow_lookup(city=Oslo)\n-> cancelled", call
    assert not run.metric("errors", kind="tool")
    ((_, latency),) = run.metric("latency_ms", kind="tool", tool="slow_lookup")
    assert 150 < latency < 5000


def test_a_tool_returning_an_error_for_its_own_failed_llm_call_is_one_error(repo: Path) -> None:
    """README: a tool that fails *or returns an error* because of an error already counted
    under it (its own LLM call) adds none."""
    from llama_index.core.tools import FunctionTool, ToolOutput


    inner = FailingLLM()

    def ask(q: str) -> str:
        """Asks a failing LLM."""
        try:
            return inner.complete(q).text
        except Exception as exc:
            return f"could not ask: {exc}"

    tool = FunctionTool.from_defaults(ask, name="ask", callback=lambda out: ToolOutput(
        content=str(out), tool_name="ask", raw_input={}, raw_output=out,
        is_error=str(out).startswith("could not ask")))
    with recording(repo):
        assert tool.call(q="hello").is_error
    run = only_run(repo)
    assert len(run.metric("errors", kind="llm")) == 1
    assert not run.metric("errors", kind="tool")
    assert len(_log_records(repo, run.hash)) == 1


def test_predict_and_call_failing_on_the_last_of_parallel_tools_is_one_error(
        repo: Path) -> None:
    """Parallel tool calls under `predict_and_call(error_on_tool_error=True)`: the
    ValueError joins every output by blank lines; the failing tool's, last here, was
    counted under its tool already: one error, not an LLM failure too."""
    from llama_index.core.tools import FunctionTool


    def alpha(x: int) -> str:
        """Tool alpha."""
        return "alpha fine"

    def beta(x: int) -> str:
        """Tool beta."""
        raise KeyError("beta broke")

    tools = [FunctionTool.from_defaults(alpha, name="alpha"),
             FunctionTool.from_defaults(beta, name="beta")]
    with recording(repo), pytest.raises(ValueError, match="beta broke"):
        _TwoToolsAtOnce().predict_and_call(tools, user_msg="use both",
                                           allow_parallel_tool_calls=True,
                                           error_on_tool_error=True)
    run = only_run(repo)
    assert [v for _, v in run.metric("errors", kind="tool")] == [1.0]
    assert not run.metric("errors", kind="llm")
    (entry,) = _log_records(repo, run.hash)
    assert entry["args"]["exception_type"] == "KeyError"


def test_an_earlier_error_reraised_after_a_later_one_is_still_one_error(repo: Path) -> None:
    """README: `errors` once per exception, at the innermost component that raised it. Two
    tools fail; the step re-raises the first one after the second was counted: the step
    adds no third error."""

    from llama_index.core.tools import FunctionTool
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    async def alpha(x: int) -> str:
        """Tool alpha."""
        raise ValueError("alpha broke")

    async def beta(x: int) -> str:
        """Tool beta."""
        raise KeyError("beta broke")

    tools = [FunctionTool.from_defaults(async_fn=alpha, name="alpha"),
             FunctionTool.from_defaults(async_fn=beta, name="beta")]

    class Both(Workflow):
        @step
        async def go(self, ev: StartEvent) -> StopEvent:
            first, _second = await asyncio.gather(*(t.acall(x=1) for t in tools),
                                                  return_exceptions=True)
            raise first

    async def main() -> None:
        with pytest.raises(ValueError, match="alpha broke"):
            await Both(timeout=30).run()

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    assert len(run.metric("errors", kind="tool")) == 2
    assert not run.metric("errors", kind="workflow_step")
    assert not run.metric("errors", kind="workflow")


def test_a_tool_failing_because_of_an_llm_failure_under_an_inner_tool_is_one_error(
        repo: Path) -> None:
    """An LLM call fails under an inner tool, which swallows it; the outer tool then gives
    up because of it: the error counted under it (two levels down) is its only one."""
    from llama_index.core.tools import FunctionTool

    llm = FailingLLM()

    def ask(q: str) -> str:
        """Asks a failing LLM, quietly."""
        try:
            return llm.complete(q).text
        except Exception:
            return ""

    inner = FunctionTool.from_defaults(ask, name="ask")

    def research(q: str) -> str:
        """Research through `ask`."""
        if not inner.call(q=q).content:
            raise RuntimeError("research gave up")
        return "found"

    with recording(repo), pytest.raises(RuntimeError, match="gave up"):
        FunctionTool.from_defaults(research, name="research").call(q="hello")
    run = only_run(repo)
    assert len(run.metric("errors", kind="llm")) == 1
    assert not run.metric("errors", kind="tool")


def test_a_failure_the_callback_channel_sees_first_is_one_error(repo: Path) -> None:
    """README: `errors` once per exception, also when it reaches both channels. A splitter
    fails inside a workflow step: its NODE_PARSING event's payload carries the exception
    before the step's span fails with it; the step and the run add none."""
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    class Broken(SentenceSplitter):
        def _parse_nodes(self, nodes: Any, show_progress: bool = False, **kwargs: Any) -> Any:
            raise ValueError("cannot split")

    class Ingest(Workflow):
        @step
        async def split(self, ev: StartEvent) -> StopEvent:
            Broken().get_nodes_from_documents([Document(text="one two three")])
            return StopEvent(result="never")

    async def main() -> None:
        with pytest.raises(ValueError, match="cannot split"):
            await Ingest(timeout=30).run()

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    errors = {k: v for k, v in run.metrics.items() if k[0] == "errors"}
    assert sum(len(v) for v in errors.values()) == 1, errors
    assert "error ValueError" in traces(run, "workflow")[0]


def test_a_query_cancelled_by_a_timeout_says_cancelled_not_error(repo: Path) -> None:
    """README: a cancelled call is recorded as cancelled, not as an error; the trace says
    status `cancelled` (the request's and its LLM call's spans)."""
    engine = _index().as_query_engine(llm=SlowLLM(delay=5.0))

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.aquery(QUESTIONS[0]), 0.3)  # the app gives up

    with recording(repo):
        asyncio.run(main())
    run = only_run(repo)
    (trace,) = traces(run, "query")
    lines = trace.splitlines()
    assert "· cancelled ·" in lines[1], trace
    assert [line.split()[2] for line in lines[2:] if "SlowLLM" in line] == ["cancelled"], trace
    assert not [k for k in run.metrics if k[0] == "errors"], trace
    assert not run.text("answer", kind="query")


def test_a_request_whose_stream_is_being_read_at_shutdown_is_timed_to_the_shutdown(
        repo: Path) -> None:
    """README: `incomplete at shutdown` is timed to the shutdown when something still ran
    under it — its LLM stream, read part-way, counts (its spans had all returned)."""
    engine = _index().as_query_engine(streaming=True, llm=RuleLLM())
    with recording(repo):
        reading = engine.query(QUESTIONS[0]).response_gen
        next(reading), next(reading)
        time.sleep(0.6)  # still reading when the app shuts down
    run = only_run(repo)
    (trace,) = traces(run, "query")
    header = trace.splitlines()[1]
    assert "incomplete at shutdown" in header, trace
    assert float(header.split(" ms")[0]) >= 550, trace
    del reading


def test_a_request_cut_off_by_shutdown_has_no_answer_from_an_earlier_llm_call(
        repo: Path) -> None:
    """README: at shutdown a request has an answer only if one was complete — not the text
    of an LLM call it made before it was cut off."""
    import contextvars

    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    class Draft(Workflow):
        @step
        async def write(self, ev: StartEvent) -> StopEvent:
            draft = await Settings.llm.acomplete(f"draft about {ev.topic}")
            await asyncio.sleep(2.0)  # still polishing when the app shuts down
            return StopEvent(result=str(draft))

    async def main() -> None:
        await Draft(timeout=30).run(topic="cats")

    with recording(repo):
        worker = threading.Thread(target=contextvars.copy_context().run,
                                  args=(asyncio.run, main()))
        worker.start()
        time.sleep(0.6)
    worker.join()
    run = only_run(repo)
    (trace,) = traces(run, "workflow")
    assert "incomplete at shutdown" in trace.splitlines()[1], trace
    assert [q for _, q in run.text("question", kind="workflow")] == ["cats"]
    assert not run.text("answer", kind="workflow")


def test_rough_token_counts_are_marked_in_the_trace(repo: Path) -> None:
    """README: trace token counts marked `~` are rough (characters / 4); a total with a
    rough part is marked `~` too."""
    engine = _index().as_query_engine(similarity_top_k=2)  # MockLLM: no provider usage
    with recording(repo):
        engine.query(QUESTIONS[0])
    (trace,) = traces(only_run(repo), "query")
    assert re.search(r" · tokens ~\d+$", trace.splitlines()[1]), trace
    assert re.search(r"MockLLM\.predict .* llm [\d.]+ms tokens=~\d+\+~\d+$", trace, re.M), trace


def test_past_the_open_request_cap_the_oldest_expire_first(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README (Bounds): at most 10,000 requests are tracked at once (the oldest expire
    first). Cap 2 here: three streaming queries kept unread; the first one expires."""
    from aim_llama import observer

    monkeypatch.setattr(observer, "MAX_OPEN_ROOTS", 2)
    engine = _index().as_query_engine(streaming=True)
    with recording(repo):
        kept = [engine.query(q) for q in QUESTIONS[:3]]
    run = only_run(repo)
    questions = dict(run.text("question", kind="query"))
    status = {questions[s]: t.splitlines()[1] for s, t in run.text("trace", kind="query")}
    assert "expired (incomplete)" in status[QUESTIONS[0]], status
    for q in QUESTIONS[1:3]:
        assert "incomplete at shutdown" in status[q], status
    del kept


# -- Edges found by a mutation audit of activation, the callback handler and the dispatcher
# records (2026-11-28).


def test_reranks_and_sub_questions_are_recorded_by_the_dispatcher_only(repo: Path) -> None:
    """README: each piece of data goes to exactly one channel. A reranker and a sub-question
    engine built while recording also report CallbackManager events (`reranking`,
    `sub_question`); those are the dispatcher's, so they add no second `latency_ms` line."""
    from llama_index.core.postprocessor.structured_llm_rerank import StructuredLLMRerank
    from llama_index.core.query_engine import SubQuestionQueryEngine
    from llama_index.core.question_gen import LLMQuestionGenerator
    from llama_index.core.tools import QueryEngineTool

    with recording(repo):
        reranked = _index().as_query_engine(
            similarity_top_k=3, node_postprocessors=[StructuredLLMRerank(llm=RuleLLM(), top_n=2)])
        reranked.query("rank these")
        rule = RuleLLM()
        tool = QueryEngineTool.from_defaults(_index().as_query_engine(), name="docs",
                                             description="the docs")
        SubQuestionQueryEngine.from_defaults(
            query_engine_tools=[tool], llm=rule,
            question_gen=LLMQuestionGenerator.from_defaults(llm=rule), use_async=False,
        ).query("compare topic 1 and topic 2")
    run = only_run(repo)
    assert len(run.metric("latency_ms", kind="rerank", reranker="StructuredLLMRerank")) == 1
    kinds = {dict(ctx).get("kind") for _, ctx in run.sequences()}
    assert not kinds & {"reranking", "sub_question"}, kinds


class _BrokenSplitter:
    """A `SentenceSplitter` whose splitting fails (inside LlamaIndex's CHUNKING event)."""

    @staticmethod
    def make() -> Any:
        from llama_index.core.node_parser import SentenceSplitter

        class Broken(SentenceSplitter):
            def _split(self, text: str, chunk_size: int) -> Any:
                raise ValueError("splitter broke")

        return Broken()


@pytest.mark.parametrize("ignored", [False, True])
def test_an_index_build_failure_follows_the_exception_ignore_list(repo: Path, ignored: bool) -> None:
    """README: with `exception` in the ignore lists no `errors` point or Logs entry is
    recorded, whichever channel sees the error — also a splitter's failure in an index build,
    which only the CallbackManager's CHUNKING event carries (no request is open)."""
    overrides = {"event_ends_to_ignore": ["exception"]} if ignored else {}
    with recording(repo, **overrides), pytest.raises(ValueError, match="splitter broke"):
        VectorStoreIndex.from_documents([Document(text="one. two. three.")],
                                        transformations=[_BrokenSplitter.make()])
    run = only_run(repo)
    errors = [k for k in run.metrics if k[0] == "errors"]
    assert (errors == []) if ignored else (run.metric("errors", kind="chunking") == [(0, 1.0)]), errors


def test_the_usage_of_every_inner_call_counts_for_the_outer_one(repo: Path) -> None:
    """README: the provider's usage of an inner call counts for the outer one when the outer
    response carries none — of each inner call, when the outer makes several (a draft, then a
    refinement): the one recorded call holds their sum, not the last one's usage."""
    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback

    inner = RuleLLM(usage=USAGE)

    class TwoStep(CustomLLM):
        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(model_name="two-step")

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kw: Any) -> CompletionResponse:
            draft = inner.complete("draft: " + prompt).text
            return CompletionResponse(text=inner.complete("refine: " + draft).text)

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kw: Any) -> Any:
            raise NotImplementedError

    with recording(repo):
        TwoStep().complete("hello")
    run = only_run(repo)
    assert [t for _, t in run.text("prompt", kind="llm")] == ["hello"]  # one call
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert run.metric(name, kind="llm", source="provider") == [(0, 2.0 * USAGE[name])], name


def test_a_new_settings_callback_manager_is_followed_with_terminal_capture_on(repo: Path) -> None:
    """README: a manager the app puts in `Settings.callback_manager` after activation gets the
    handler at its next request — with the default `capture_terminal_logs = true` too (which
    chains its own per-request hook; test_capture's pipelines run with it off)."""
    from llama_index.core.callbacks import CallbackManager, LlamaDebugHandler

    original = Settings.callback_manager
    try:
        assert aim_llama.instrument(repo=str(repo), writer="thread", system_tracking_interval=None,
                                    log_system_params=False, capture_terminal_logs=True)
        from aim_llama import autoinstrument

        writer = autoinstrument._active.writer
        Settings.callback_manager = CallbackManager([LlamaDebugHandler(print_trace_on_end=False)])
        docs = [Document(text=f"Document {i} is about topic {i % 3}. " * 5) for i in range(4)]
        VectorStoreIndex.from_documents(docs).as_query_engine().query("what about topic 1?")
        aim_llama.uninstrument()
        _runs.append(writer.run_hash)
    finally:
        Settings.callback_manager = original
    run = only_run(repo)
    assert len(run.text("chunk", kind="chunking")) == 4
    assert len(run.metric("latency_ms", kind="synthesize")) == 1


def test_a_postprocessor_given_no_list_records_no_rerank_values(repo: Path) -> None:
    """`_nodes_given`: nodes that are not a list (a tuple handed in by the app) are not
    counted (-1 would be stored as `rerank_nodes_in`); a list is."""
    from llama_index.core.postprocessor import SimilarityPostprocessor
    from llama_index.core.schema import NodeWithScore, TextNode

    nodes = [NodeWithScore(node=TextNode(text=f"n{i}"), score=i / 4) for i in range(4)]
    cutoff = SimilarityPostprocessor(similarity_cutoff=0.3)
    with recording(repo):
        cutoff.postprocess_nodes(tuple(nodes))  # type: ignore[arg-type]
        cutoff.postprocess_nodes(nodes)
    run = only_run(repo)
    ctx = {"kind": "rerank", "reranker": "SimilarityPostprocessor"}
    assert run.metric("rerank_nodes_in", **ctx) == [(0, 4.0)]


def test_a_failed_rerank_has_no_latency_point(repo: Path) -> None:
    """README: `latency_ms` for each call, also one that raised — none for a failed rerank,
    whose records need the nodes it returned (and never one without its `reranker`)."""
    from llama_index.core.postprocessor.structured_llm_rerank import StructuredLLMRerank
    from llama_index.core.schema import NodeWithScore, TextNode

    rerank = StructuredLLMRerank(llm=FailingLLM(), top_n=2)
    nodes = [NodeWithScore(node=TextNode(text=f"n{i}"), score=0.5) for i in range(3)]
    with recording(repo), pytest.raises(RuntimeError):
        rerank.postprocess_nodes(nodes, query_str="rank these")
    run = only_run(repo)
    assert run.metric("errors", kind="llm") == [(0, 1.0)]
    assert not [ctx for name, ctx in run.sequences()
                if name == "latency_ms" and dict(ctx).get("kind") == "rerank"]


def test_embedding_tokens_count_every_embedded_text(repo: Path) -> None:
    """README: `embedding_tokens` per embedding call — all of its texts, not the first one."""
    texts = [f"text number {i} with a few more words in it" for i in range(5)]
    with recording(repo):
        Settings.embed_model.get_text_embedding_batch(texts)
    run = only_run(repo)
    ((_, tokens),) = run.metric("embedding_tokens", kind="embedding", source="estimated")
    each = len(Settings.tokenizer(texts[0]))
    assert tokens >= 4 * each, (tokens, each)


def test_instrument_with_the_same_settings_after_recording_says_nothing(
        repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """README: a later `instrument(**settings)` warns (strict mode: raises) only about settings
    that differ from the active ones; the same settings again change nothing, silently."""
    import logging

    from aim_llama.log import reset_reported

    reset_reported()
    same = dict(repo=str(repo), writer="thread", system_tracking_interval=None,
                log_system_params=False, capture_terminal_logs=False)
    caplog.set_level(logging.WARNING, logger="aim_llama")
    with recording(repo):
        Settings.llm.complete("recorded first")
        from aim_llama import autoinstrument

        aim_llama.flush()
        assert autoinstrument._active.writer._started
        assert aim_llama.instrument(**same) is True
        assert aim_llama.instrument(**same, strict=False) is True
    assert not [r for r in caplog.records if "came after" in r.getMessage()], caplog.text


def test_flush_says_false_when_records_were_dropped(repo: Path) -> None:
    """README (`aim_llama.flush`): False when records were dropped since the previous flush
    (a full queue), True again at the next one once nothing more was lost."""
    from aim_llama import autoinstrument
    from aim_llama.records import Track

    with recording(repo, queue_size=100):
        Settings.llm.complete("before the burst")
        assert aim_llama.flush() is True
        writer = autoinstrument._active.writer
        # one hand-off larger than the whole queue: dropped, whatever the sender's pace
        writer.submit_many([Track("burst", float(i), "metric", {"kind": "t"})
                            for i in range(101)])
        assert aim_llama.flush() is False
        Settings.llm.complete("after the burst")
        assert aim_llama.flush() is True
    run = only_run(repo)
    assert not run.metric("burst", kind="t")
    assert [t for _, t in run.text("prompt", kind="llm")] == ["before the burst",
                                                            "after the burst"]
    assert run.metric("dropped_records", kind="queue")[-1][1] == 101.0
