"""A small offline RAG app. Its only Aim-related line is `import aim_llama.auto`.

Run it with `AIM_REPO=./aim-demo python examples/rag_app.py`, then `aim up --repo ./aim-demo`.
"""

import sys

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM

import aim_llama.auto  # noqa: F401  (activates Aim recording; settings from env / aim_llama.toml)

FACTS = [
    "Aim is an open-source experiment tracker with a web UI started by `aim up`.",
    "LlamaIndex builds retrieval-augmented generation pipelines over your documents.",
    "A vector store index embeds each chunk and retrieves the most similar ones.",
    "The Eiffel Tower is in Paris and was completed in 1889.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The Rhine flows from the Swiss Alps to the North Sea.",
]
QUESTIONS = [
    "What is Aim?",
    "Where is the Eiffel Tower?",
    "What does a vector store index do?",
    "Where does the Rhine flow?",
]


def main(n_queries: int = len(QUESTIONS)) -> None:
    Settings.llm = MockLLM(max_tokens=24)
    Settings.embed_model = MockEmbedding(embed_dim=16)
    index = VectorStoreIndex.from_documents([Document(text=t) for t in FACTS])
    engine = index.as_query_engine(similarity_top_k=2)
    for i in range(n_queries):
        question = QUESTIONS[i % len(QUESTIONS)]
        answer = engine.query(question)
        print(f"Q: {question}\nA: {str(answer)[:60]}...")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else len(QUESTIONS))
