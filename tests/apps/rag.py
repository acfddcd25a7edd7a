"""Test app: a real RAG pipeline (MockLLM + MockEmbedding). Args: N_QUERIES [--no-auto] [--exit-code N]."""

import argparse
import os

parser = argparse.ArgumentParser()
parser.add_argument("n", type=int, nargs="?", default=3)
parser.add_argument("--no-auto", action="store_true")
parser.add_argument("--exit-code", type=int, default=0)
parser.add_argument("--print-hash", action="store_true")
args = parser.parse_args()

if not args.no_auto:
    import aim_llama.auto

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM

Settings.llm = MockLLM(max_tokens=8)
Settings.embed_model = MockEmbedding(embed_dim=8)
docs = [Document(text=f"Document number {i} talks about topic {i % 3}.") for i in range(6)]
engine = VectorStoreIndex.from_documents(docs).as_query_engine(similarity_top_k=2)
for i in range(args.n):
    engine.query(f"question {i}: what about topic {i % 3}?")
if args.print_hash:
    import aim_llama

    print("RUN", aim_llama.current_run_hash())
print("DONE", os.getpid(), flush=True)
raise SystemExit(args.exit_code)
