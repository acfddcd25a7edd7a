"""The real `llama-index-llms-openai` client against a loopback OpenAI-compatible fake server.

The server (stdlib `http.server` on 127.0.0.1) answers `/v1/chat/completions` with a different
`usage` for every request; the counts recorded in Aim must be exactly the provider's.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

import aim_llama
from conftest import only_run


class _FakeOpenAI(BaseHTTPRequestHandler):
    usages: ClassVar[list[dict[str, int]]] = []
    bodies: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, *args: Any) -> None:  # keep pytest output quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        n = len(self.usages)
        usage = {"prompt_tokens": 100 + n, "completion_tokens": 7 + n,
                 "total_tokens": 107 + 2 * n}
        type(self).usages.append(usage)
        type(self).bodies.append(body)
        if not self.path.endswith("/chat/completions"):
            self.send_response(404)
            self.end_headers()
            return
        if body.get("stream"):
            self._stream(n, body, usage)
            return
        payload = {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1700000000,
            "model": body.get("model", "gpt-4o-mini"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"fake answer {n}"}}],
            "usage": usage,
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


    def _stream(self, n: int, body: dict[str, Any], usage: dict[str, int]) -> None:
        """Server-sent events: three content chunks, then (include_usage) a usage-only chunk."""
        base = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk",
                "created": 1700000000, "model": body.get("model", "gpt-4o-mini")}
        chunks = [dict(base, choices=[{"index": 0, "finish_reason": None,
                                       "delta": {"role": "assistant", "content": word}}])
                  for word in ("streamed ", "fake ", f"answer {n}")]
        chunks[-1]["choices"][0]["finish_reason"] = "stop"
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(dict(base, choices=[], usage=usage))
        data = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
        data += b"data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def steps_of(seq: list[tuple[int, float]]) -> list[int]:
    return [s for s, _ in seq]


@pytest.fixture
def fake_openai() -> Iterator[str]:
    _FakeOpenAI.usages = []
    _FakeOpenAI.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_openai_client_provider_tokens_match_exactly(repo: Path, fake_openai: str) -> None:
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai import OpenAI

    Settings.embed_model = MockEmbedding(embed_dim=8)
    llm = OpenAI(model="gpt-4o-mini", api_base=fake_openai, api_key="sk-test-dummy-key-000000",
                 max_retries=0, temperature=0.1)
    docs = [Document(text=f"Document {i} is about topic {i}.") for i in range(4)]
    engine = VectorStoreIndex.from_documents(docs).as_query_engine(llm=llm, similarity_top_k=2)
    assert aim_llama.instrument(repo=str(repo), writer="thread", system_tracking_interval=None,
                                log_system_params=False, capture_terminal_logs=False)
    try:
        chat = llm.chat([ChatMessage(role="user", content="hello there")])
        answer = engine.query("what is document 1 about?")
        completion = llm.complete("say hi")
        streamed = "".join(
            r.delta or "" for r in llm.stream_chat(
                [ChatMessage(role="user", content="stream please")],
                stream_options={"include_usage": True}))
    finally:
        aim_llama.uninstrument()
    assert str(chat.message.content) == "fake answer 0"
    assert str(answer) == "fake answer 1"
    assert completion.text == "fake answer 2"
    assert streamed == "streamed fake answer 3"
    usages = _FakeOpenAI.usages
    assert len(usages) == 4
    assert _FakeOpenAI.bodies[3]["stream"] is True

    run = only_run(repo)
    for name, key in (("prompt_tokens", "prompt_tokens"),
                      ("completion_tokens", "completion_tokens"),
                      ("total_tokens", "total_tokens")):
        recorded = run.metric(name, kind="llm", source="provider")
        assert recorded == [(i, float(u[key])) for i, u in enumerate(usages)], name
        assert not run.metric(name, kind="llm", source="estimated")
    prompts = [t for _, t in run.text("prompt", kind="llm")]
    assert prompts[0] == "user: hello there"
    assert "what is document 1 about?" in prompts[1]
    assert [t for _, t in run.text("response", kind="llm")] == [
        "fake answer 0", "fake answer 1", "fake answer 2", "streamed fake answer 3"]
    assert steps_of(run.metric("ttft_ms", kind="llm")) == [3]  # only the stream has one
    models = run.params["llm_models"]
    assert models["gpt-4o-mini"]["temperature"] == 0.1
    assert not any("key" in k.lower() for k in models["gpt-4o-mini"])  # no credentials
    (trace,) = [t for _, t in run.text("trace", kind="query")]
    assert "tokens=101+8" in trace
