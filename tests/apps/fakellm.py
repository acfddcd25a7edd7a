"""Small offline LLMs for the capture tests: a scripted function-calling LLM and one that fails.

`ScriptedToolLLM` answers from a script: while the last message is not a tool result it asks
for the tool named in `tool_name` with `tool_args`; once a tool result is in the history it
answers `final: <tool output>`. Every response reports OpenAI-style usage in `raw["usage"]`
so provider token counts can be checked exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.tools import ToolSelection
from pydantic import Field

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


class ScriptedToolLLM(FunctionCallingLLM):
    """Calls one tool once, then answers with what the tool returned."""

    tool_name: str = "add"
    tool_args: dict[str, Any] = Field(default_factory=lambda: {"a": 2, "b": 3})
    calls: int = 0

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="scripted-tool-llm", is_function_calling_model=True,
                           is_chat_model=True)

    def _respond(self, messages: Sequence[ChatMessage]) -> ChatResponse:
        self.calls += 1
        last = messages[-1] if messages else None
        if last is not None and last.role == MessageRole.TOOL:
            msg = ChatMessage(role=MessageRole.ASSISTANT, content=f"final: {last.content}")
        else:
            msg = ChatMessage(
                role=MessageRole.ASSISTANT,
                content="",
                additional_kwargs={"tool_calls": [{
                    "id": f"call_{self.calls}", "type": "function",
                    "function": {"name": self.tool_name, "arguments": json.dumps(self.tool_args)},
                }]},
            )
        return ChatResponse(message=msg, raw={"usage": dict(USAGE)})

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._respond(messages)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._respond(messages)

    @llm_chat_callback()
    def stream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> Generator[ChatResponse, None, None]:
        response = self._respond(messages)

        def gen() -> Generator[ChatResponse, None, None]:
            yield ChatResponse(message=response.message, delta=response.message.content or "",
                               raw=response.raw)

        return gen()

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> AsyncGenerator[ChatResponse, None]:
        response = self._respond(messages)

        async def gen() -> AsyncGenerator[ChatResponse, None]:
            yield ChatResponse(message=response.message, delta=response.message.content or "",
                               raw=response.raw)

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text="done", raw={"usage": dict(USAGE)})

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self.complete(prompt)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        def gen() -> Generator[CompletionResponse, None, None]:
            yield CompletionResponse(text="done", delta="done")
        return gen()

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        async def gen() -> AsyncGenerator[CompletionResponse, None]:
            yield CompletionResponse(text="done", delta="done")
        return gen()

    def _prepare_chat_with_tools(self, tools: Sequence[Any], user_msg: Any = None,
                                 chat_history: Any = None, verbose: bool = False,
                                 allow_parallel_tool_calls: bool = False,
                                 tool_required: bool = False, **kwargs: Any) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(user_msg if isinstance(user_msg, ChatMessage)
                            else ChatMessage(role=MessageRole.USER, content=user_msg))
        return {"messages": messages, "tools": [t.metadata.to_openai_tool() for t in tools]}

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        calls = response.message.additional_kwargs.get("tool_calls") or []
        return [ToolSelection(tool_id=c["id"], tool_name=c["function"]["name"],
                              tool_kwargs=json.loads(c["function"]["arguments"])) for c in calls]


class FailingLLM(CustomLLM):
    """An LLM whose every call raises `RuntimeError(message)` (streams: "backend down")."""

    message: str = "backend down sk-abcdefghijklmnopqrstuvwx"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="failing-llm")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        raise RuntimeError(self.message)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise RuntimeError("backend down")


class SlowLLM(CustomLLM):
    """An LLM whose async calls wait `delay` seconds, as a network call does (to be cancelled)."""

    delay: float = 1.0

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="slow-llm")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text="slow answer")

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any
                        ) -> CompletionResponse:
        import asyncio

        await asyncio.sleep(self.delay)
        return CompletionResponse(text="slow answer")

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError


class RuleLLM(CustomLLM):
    """A completion LLM that answers by rules: rerank JSON, sub-question JSON, ReAct steps, else text.

    Enough to drive `StructuredLLMRerank`, `SubQuestionQueryEngine` and `ReActAgent` offline.
    """

    tool_name: str = "docs"
    calls: int = 0
    fail_after: int | None = None  # streams raise RuntimeError after this many chunks
    first_delay: float = 0.0  # seconds before a stream's first chunk (time to first token)
    chunk_delay: float = 0.0  # seconds between a stream's chunks
    usage: dict[str, int] | None = None  # reported with non-streamed responses, ...
    usage_at: str = "usage"  # ... in `raw[usage_at]`, or in the response's "additional_kwargs"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="rule-llm")

    def _text(self, prompt: str) -> str:
        self.calls += 1
        if "Relevance: 7" in prompt:  # LLMRerank's choice-select prompt
            return "Doc: 2, Relevance: 9\nDoc: 1, Relevance: 4"
        if "document_number" in prompt:
            return json.dumps({"documents": [{"document_number": 2, "relevance": 9},
                                             {"document_number": 1, "relevance": 4}]})
        if "sub_question" in prompt:
            questions = [{"sub_question": "what is topic 1?", "tool_name": self.tool_name},
                         {"sub_question": "what is topic 2?", "tool_name": self.tool_name}]
            return "```json\n" + json.dumps(questions) + "\n```"
        if "Action Input" in prompt and "Observation" not in prompt.rsplit("user:", 1)[-1]:
            return ('Thought: I need to use a tool to help me answer the question.\n'
                    'Action: add\nAction Input: {"a": 2, "b": 3}')
        if "Action Input" in prompt:
            return "Thought: I can answer without using any more tools.\nAnswer: the sum is 5"
        return "an answer from the rule llm"

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        if not self.usage:
            return CompletionResponse(text=self._text(prompt))
        if self.usage_at == "additional_kwargs":
            return CompletionResponse(text=self._text(prompt), additional_kwargs=dict(self.usage))
        return CompletionResponse(text=self._text(prompt), raw={self.usage_at: dict(self.usage)})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        text = self._text(prompt)

        def gen() -> Generator[CompletionResponse, None, None]:
            so_far = ""
            for i, word in enumerate(text.split(" ")):
                time.sleep(self.first_delay if i == 0 else self.chunk_delay)
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError("stream broke")
                delta = word if not so_far else " " + word
                so_far += delta
                yield CompletionResponse(text=so_far, delta=delta)

        return gen()

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        import asyncio

        text = self._text(prompt)

        async def gen() -> AsyncGenerator[CompletionResponse, None]:
            so_far = ""
            for i, word in enumerate(text.split(" ")):
                await asyncio.sleep(self.first_delay if i == 0 else self.chunk_delay)
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError("stream broke")
                delta = word if not so_far else " " + word
                so_far += delta
                yield CompletionResponse(text=so_far, delta=delta)

        return gen()


class WordEmbedding(BaseEmbedding):
    """Offline embeddings that tell texts apart: counts of a few words, so retrieval scores
    differ from node to node (MockEmbedding gives every node the same score)."""

    vocabulary: tuple[str, ...] = ("topic", "0", "1", "2", "document", "number", "which")

    def _vector(self, text: str) -> list[float]:
        words = text.lower().replace(".", " ").replace("?", " ").split()
        return [words.count(w) + 0.1 * (i + 1) for i, w in enumerate(self.vocabulary)]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)
