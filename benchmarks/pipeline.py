"""The mock RAG pipeline every benchmark measures: one definition, so the numbers compare.

50 documents of ~60 words, `MockLLM(max_tokens=16)`, `MockEmbedding(embed_dim=16)`, a
`VectorStoreIndex` query engine with `similarity_top_k=2`. Import LlamaIndex only when called:
callers activate aim-llama (or not) before LlamaIndex is imported, as an application would.
"""

from __future__ import annotations

from typing import Any

TOPICS = ("retrieval", "embeddings", "vector stores", "prompting", "evaluation")


def make_docs(n: int) -> list[Any]:
    """n short documents of about 60 words each, deterministic."""
    from llama_index.core import Document

    docs = []
    for i in range(n):
        words = " ".join(f"term{(i * 7 + j) % 97}" for j in range(50))
        docs.append(Document(text=f"Document {i} is about {TOPICS[i % len(TOPICS)]}. {words}."))
    return docs


def question(i: int) -> str:
    """The i-th query (they differ, so nothing along the way can cache an answer)."""
    return f"Question {i}: what do the documents say about {TOPICS[i % len(TOPICS)]}?"


def build_engine(docs: int = 50) -> Any:
    """Set the mock models on LlamaIndex's Settings and return the query engine."""
    from llama_index.core import Settings, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM

    Settings.llm = MockLLM(max_tokens=16)
    Settings.embed_model = MockEmbedding(embed_dim=16)
    return VectorStoreIndex.from_documents(make_docs(docs)).as_query_engine(similarity_top_k=2)
