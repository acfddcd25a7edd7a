"""A small offline agent app: a LlamaIndex `FunctionAgent` with three tools. No Aim code at all.

Run it through the launcher, which turns recording on without touching the code:

    AIM_REPO=./aim-demo aim-llama run -- python examples/agent_app.py
    aim up --repo ./aim-demo

Each question becomes an `agent` request in Aim: its question, answer, latency and trace,
every model call (prompt, response, tokens), every tool call (`tool_call` texts, one line per
tool in the UI), the agent's steps, and — for the capital of Atlantis — the tool's error.
The model is a few lines of rules (below), so the app needs no API key and no network.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.tools import FunctionTool, QueryEngineTool, ToolSelection

CAPITALS = {"france": "Paris", "japan": "Tokyo", "kenya": "Nairobi"}
NOTES = [
    "The team meeting moved to Thursdays at 10:00.",
    "The staging server is rebuilt every night at 02:00 UTC.",
    "Expense reports are due on the last working day of the month.",
]
QUESTIONS = [
    "What is 6 times 7?",
    "What is the capital of Japan?",
    "What is the capital of Atlantis?",
    "When is the staging server rebuilt?",
]


def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


def capital(country: str) -> str:
    """The capital city of a country."""
    if country.lower() not in CAPITALS:
        raise ValueError(f"no capital known for {country}")
    return CAPITALS[country.lower()]


def first_context_line(prompt: str) -> str:
    """What the rule model answers a RAG prompt with: the context line sharing most words
    with the query (MockEmbedding retrieves by nothing, so the notes engine gets them all)."""
    parts = prompt.split("---------------------")
    lines = [line for line in (parts[1] if len(parts) > 2 else "").splitlines()
             if line.strip() and ":" not in line[:20]]
    query = set(re.findall(r"\w+", prompt.rsplit("Query:", 1)[-1].lower()))
    return max(lines, key=lambda line: len(query & set(re.findall(r"\w+", line.lower()))),
               default="I do not know.")


class RuleModel(FunctionCallingLLM):
    """A stand-in for a function-calling model: picks a tool by keyword, then answers with
    what the tool returned. Real models (OpenAI, Anthropic …) are recorded the same way."""

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="rule-model", is_function_calling_model=True,
                           is_chat_model=True)

    def _respond(self, messages: Sequence[ChatMessage]) -> ChatResponse:
        last = messages[-1]
        text = str(last.content or "")
        if last.role == MessageRole.TOOL:
            reply = f"The tool said: {text}"
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=reply))
        if "---------------------" in text:  # the notes' query engine asking
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT,
                                                    content=first_context_line(text)))
        numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", text)]
        country = re.search(r"capital of (\w+)", text)
        call: tuple[str, dict[str, Any]]
        if "times" in text and len(numbers) == 2:
            call = ("multiply", {"a": numbers[0], "b": numbers[1]})
        elif country:
            call = ("capital", {"country": country.group(1)})
        else:
            call = ("search_notes", {"input": text})
        tool_call = {"id": f"call_{len(messages)}", "type": "function",
                     "function": {"name": call[0], "arguments": json.dumps(call[1])}}
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content="",
                                                additional_kwargs={"tool_calls": [tool_call]}))

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._respond(messages)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._respond(messages)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage],
                    **kwargs: Any) -> Generator[ChatResponse, None, None]:
        response = self._respond(messages)

        def gen() -> Generator[ChatResponse, None, None]:
            yield ChatResponse(message=response.message, delta=response.message.content or "")

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage],
                           **kwargs: Any) -> AsyncGenerator[ChatResponse, None]:
        response = self._respond(messages)

        async def gen() -> AsyncGenerator[ChatResponse, None]:
            yield ChatResponse(message=response.message, delta=response.message.content or "")

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=first_context_line(prompt))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=first_context_line(prompt))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _prepare_chat_with_tools(self, tools: Sequence[Any], user_msg: Any = None,
                                 chat_history: Any = None, verbose: bool = False,
                                 allow_parallel_tool_calls: bool = False,
                                 tool_required: bool = False, **kwargs: Any) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(user_msg if isinstance(user_msg, ChatMessage)
                            else ChatMessage(role=MessageRole.USER, content=user_msg))
        return {"messages": messages, "tools": [t.metadata.to_openai_tool() for t in tools]}

    def get_tool_calls_from_response(self, response: ChatResponse,
                                     error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        calls = response.message.additional_kwargs.get("tool_calls") or []
        return [ToolSelection(tool_id=c["id"], tool_name=c["function"]["name"],
                              tool_kwargs=json.loads(c["function"]["arguments"])) for c in calls]


def build_agent() -> FunctionAgent:
    Settings.embed_model = MockEmbedding(embed_dim=16)
    notes = VectorStoreIndex.from_documents([Document(text=t) for t in NOTES])
    search_notes = QueryEngineTool.from_defaults(
        notes.as_query_engine(llm=RuleModel(), similarity_top_k=3),
        name="search_notes", description="Search the team's notes.")
    return FunctionAgent(
        tools=[FunctionTool.from_defaults(multiply), FunctionTool.from_defaults(capital),
               search_notes],
        llm=RuleModel(), system_prompt="Answer with the tools.")


async def main(n_questions: int = len(QUESTIONS)) -> None:
    agent = build_agent()
    for i in range(n_questions):
        question = QUESTIONS[i % len(QUESTIONS)]
        answer = await agent.run(user_msg=question)
        print(f"Q: {question}\nA: {str(answer)[:70]}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else len(QUESTIONS)))
