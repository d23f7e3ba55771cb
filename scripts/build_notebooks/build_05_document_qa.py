"""python scripts/build_notebooks/build_05_document_qa.py

Writes the first version of notebooks/05_Document_QA.ipynb (without outputs).
Execute it afterwards: python scripts/run_notebooks.py 05_Document_QA.ipynb
"""

from __future__ import annotations

import argparse

from nbtools import code, md, write

NAME = "05_Document_QA.ipynb"

CELLS = [
    md("""
# 05 · Document question answering (RAG)

A small model does not know *your* documents. Retrieval-augmented generation (RAG) fixes
that without any training: cut the documents into chunks, turn every chunk into a vector,
find the chunks closest to a question, and hand those to the model with the question.

```
files ─► text ─► chunks ─► vectors ─► vector store
                                          │  question ─► vector ─► nearest chunks
                                          ▼
                          prompt with numbered sources ─► answer citing [1], [2]
```

This notebook builds each step by hand, then uses `llmlab.rag`, the code behind
`python part3/document_qa.py`. The documents are the sample corpus in `part3/data/docs`:
eight short files about an invented makerspace, so the model cannot answer from memory.
"""),
    md(
        "**Parameters.** CI runs this notebook with smaller values (see `ci_parameters` in its metadata)."
    ),
    code(
        """
# Parameters
CHUNK_SIZES = [200, 400, 800]   # chunk sizes (characters) to compare for retrieval quality
KS = [1, 2, 3, 5]               # recall@k is measured for each k
TOP_K = 3                       # chunks given to the model per question
MAX_TOKENS = 60                 # longest generated answer
""",
        "parameters",
    ),
    code("""
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from llmlab.rag import (
    DEFAULT_THRESHOLD, DocumentStore, QuestionAnswerer, get_embedder, load_file, make_splitter, split_units,
)
from llmlab.rag.evaluate import SAMPLE_DOCS, load_questions, recall_at_k

DB = Path(tempfile.mkdtemp(prefix="llmlab-nb05-"))   # a throw-away store, so your own collections stay untouched
sorted(p.name for p in SAMPLE_DOCS.iterdir())
"""),
    md("""
## 1. Chunking by hand

A model reads a few hundred tokens of context comfortably, and an embedding model
(all-MiniLM-L6-v2) reads at most 256 word pieces. So documents are cut into chunks. The
simplest way is a fixed-size window that slides with some overlap, so a sentence cut at
one edge appears whole in the neighbouring chunk.
"""),
    code("""
text = (SAMPLE_DOCS / "membership.md").read_text()

def fixed_chunks(text, size, overlap):
    step = size - overlap
    return [text[start:start + size] for start in range(0, max(len(text) - overlap, 1), step)]

by_hand = fixed_chunks(text, size=200, overlap=30)
print(len(text), "characters ->", len(by_hand), "chunks")
for chunk in by_hand[:3]:
    print("---", repr(chunk))
"""),
    md("""
The windows cut words and table rows in half. LangChain's `RecursiveCharacterTextSplitter`
tries separators in order (for Markdown: headings first, then paragraphs, lines, words)
and only cuts inside a word as a last resort. `llmlab.rag` picks a Markdown-aware splitter
for `.md` and a Python-aware one (class and def first) for `.py`.
"""),
    code("""
splitter = make_splitter(".md", chunk_size=200, chunk_overlap=30)
for chunk in splitter.split_text(text)[:4]:
    print("---", repr(chunk))
"""),
    md("""
`split_units` does the same for loaded files and remembers where each chunk came from:
a line range, or the page for a PDF, plus a content hash.
"""),
    code("""
for path in ["membership.md", "annual_report_2024.pdf", "equipment.html"]:
    chunks = split_units(load_file(SAMPLE_DOCS / path), chunk_size=400, chunk_overlap=50)
    print(f"{path:24} {len(chunks)} chunks:", ", ".join(c.location for c in chunks), "| hash", chunks[0].content_hash[:10])
"""),
    md("""
## 2. Embeddings and cosine similarity

An embedding model maps a text to a vector such that texts with similar meaning point in
similar directions. Their similarity is the cosine of the angle between them: 1 for the
same direction, about 0 for unrelated texts. The lab's embedder returns vectors of length
1, so the cosine is just the dot product.
"""),
    code("""
embedder = get_embedder()          # all-MiniLM-L6-v2 from its pip package, on pick_device()
sentences = [
    "How much is a monthly membership?",
    "Full members pay 60 euros per month.",
    "Where do I find the first aid kit?",
    "The first aid kit is in the kitchen, above the sink.",
    "Never cut PVC with the laser.",
    "The capital of Mongolia is Ulaanbaatar.",
]
vectors = np.array(embedder.embed_documents(sentences))
print(vectors.shape, "device:", embedder.device, "| lengths:", np.linalg.norm(vectors, axis=1).round(3))
a, b = vectors[0], vectors[1]
print("cosine by hand:", round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 3))
"""),
    code("""
similarity = vectors @ vectors.T
labels = [s[:28] + "…" for s in sentences]
fig, ax = plt.subplots(figsize=(7, 5.5))
image = ax.imshow(similarity, vmin=-0.1, vmax=1, cmap="viridis")
ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right")
ax.set_yticks(range(len(labels)), labels)
for i in range(len(labels)):
    for j in range(len(labels)):
        ax.text(j, i, f"{similarity[i, j]:.2f}", ha="center", va="center", color="white" if similarity[i, j] < 0.6 else "black", fontsize=8)
fig.colorbar(image, label="cosine similarity")
ax.set_title("Questions sit close to the sentences that answer them")
plt.tight_layout()
plt.show()
"""),
    md("""
## 3. The vector store

A vector store keeps the chunks, their vectors and metadata, and finds the nearest
vectors quickly. The lab uses Chroma, embedded in the process (no server), saved in a
folder: `$LLMLAB_HOME/rag` by default, a temporary folder here. Ingestion is incremental:
each chunk records its file's sha256, so a second run skips unchanged files.
"""),
    code("""
store = DocumentStore("notebook", db_dir=DB, create=True)
print(store.ingest([SAMPLE_DOCS]).summary())
print(store.ingest([SAMPLE_DOCS]).summary())   # nothing changed: nothing embedded again
"""),
    code("""
for hit in store.search("Who was the volunteer of the year?", top_k=3):
    print(f"{hit.score:.2f}  {hit.metadata['file_name']}, {hit.location}: {hit.text[:70]!r}")
"""),
    md("""
The score is the cosine similarity (Chroma returns the cosine *distance*, 1 − similarity).
How high must it be to count as relevant? The question set has 26 questions the documents
answer and 5 they do not. The best score of each shows where to draw the line; below the
threshold `llmlab.rag` answers that the documents do not contain the answer, without
calling the model at all.
"""),
    code("""
questions = load_questions()
best = {q.question: store.search(q.question, 1)[0].score for q in questions}
answerable = [best[q.question] for q in questions if q.answerable]
unanswerable = [best[q.question] for q in questions if not q.answerable]
fig, ax = plt.subplots(figsize=(7, 2.6))
ax.scatter(answerable, np.zeros(len(answerable)) + 1, label="answer is in the documents", alpha=0.7)
ax.scatter(unanswerable, np.zeros(len(unanswerable)), label="answer is not", color="tab:red", alpha=0.7)
ax.axvline(DEFAULT_THRESHOLD, color="gray", linestyle="--", label=f"threshold {DEFAULT_THRESHOLD}")
ax.set_yticks([0, 1], ["not answerable", "answerable"])
ax.set_ylim(-0.6, 1.6)
ax.set_xlabel("similarity of the best chunk")
ax.legend(loc="lower right", fontsize=8)
plt.tight_layout()
plt.show()
print(f"lowest answerable {min(answerable):.2f}, highest unanswerable {max(unanswerable):.2f}")
"""),
    md("""
## 4. Retrieval quality: recall@k

Recall@k is the share of questions for which a chunk from the right file is among the
top k results. It depends on the chunk size: small chunks are precise but may split an
answer; large ones blur several topics into one vector.
"""),
    code("""
recall = {}
for size in CHUNK_SIZES:
    trial = DocumentStore(f"size-{size}", db_dir=DB, create=True)
    trial.ingest([SAMPLE_DOCS], chunk_size=size, chunk_overlap=size // 8)
    recall[size] = recall_at_k(trial, questions, KS)
    print(f"chunk size {size:4}: {trial.count():3} chunks, " + ", ".join(f"recall@{k} {v:.2f}" for k, v in recall[size].items()))
"""),
    code("""
fig, ax = plt.subplots(figsize=(6, 3.5))
for size, by_k in recall.items():
    ax.plot(list(by_k), list(by_k.values()), marker="o", label=f"chunk size {size}")
ax.set_xlabel("k (chunks retrieved)")
ax.set_ylabel("recall@k")
ax.set_xticks(KS)
ax.set_ylim(0, 1.05)
ax.legend()
ax.set_title("Is the right file among the top k chunks?")
plt.tight_layout()
plt.show()
"""),
    md("""
## 5. Answers with citations

`QuestionAnswerer` puts the relevant chunks into the prompt, numbered [1], [2] …, and asks
the lab's default chat model (SmolLM2-135M, via `llmlab.backends.load`) to answer from them
and cite. A 135M-parameter model is tiny: it often gets the fact right, sometimes not, so
the sources are always shown next to the answer for checking. If the model forgets to cite,
the sources it was given are listed.
"""),
    code("""
qa = QuestionAnswerer(store, top_k=TOP_K, max_tokens=MAX_TOKENS)
for question in ["Where is the first aid kit?", "What is the capital of Mongolia?"]:
    answer = qa.ask(question)
    print("Q:", question)
    print("A:", answer.text)
    for n, hit in enumerate(answer.sources, start=1):
        print(f"   [{n}] {hit.metadata['file_name']}, {hit.location} (score {hit.score:.2f})")
    print()
"""),
    code("""
from llmlab.rag.answer import build_messages

print(build_messages("Where is the first aid kit?", store.search("Where is the first aid kit?", 2))[1]["content"])
"""),
    md("""
## 6. The LangChain way

The same collection can be used from LangChain: `LabRetriever` is a LangChain
`BaseRetriever`, and `as_langchain_vectorstore` opens the collection as a
`langchain_chroma.Chroma` vector store with the same embedding model. Either plugs into
LangChain chains (LCEL) like any other retriever. Below, a chain feeds the retriever's
chunks and the question to the lab's model. Compare its answer with the sources it was
given: a model this small sometimes misreads a number or a table row, which is exactly
why every answer here comes with its sources.
"""),
    code("""
from llmlab.rag.langchain_adapters import LabRetriever, as_langchain_vectorstore

retriever = LabRetriever(store=store, k=2)
for doc in retriever.invoke("Can I bring guests?"):
    print(f"{doc.metadata['score']:.2f} {doc.metadata['file_name']}: {doc.page_content[:60]!r}")

vectorstore = as_langchain_vectorstore(store)
for doc, score in vectorstore.similarity_search_with_relevance_scores("Can I bring guests?", k=2):
    print(f"{score:.2f} {doc.metadata['file_name']}: {doc.page_content[:60]!r}")
"""),
    code("""
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

def format_docs(docs):
    return "\\n\\n".join(f"[{n}] {d.page_content}" for n, d in enumerate(docs, start=1))

def generate(inputs):
    messages = [
        {"role": "system", "content": "Answer the question using only the numbered sources. Cite sources like [1]."},
        {"role": "user", "content": f"Sources:\\n{inputs['context']}\\n\\nQuestion: {inputs['question']}\\nAnswer in one sentence with a citation like [1]."},
    ]
    return qa.model.chat(messages, max_tokens=MAX_TOKENS, temperature=0.0).text

chain = {"context": retriever | RunnableLambda(format_docs), "question": RunnablePassthrough()} | RunnableLambda(generate)
question = "How much does a day pass cost?"
print("answer:", chain.invoke(question))
print("sources it was given:")
print(format_docs(retriever.invoke(question)))
"""),
    md("""
## Clean up, and next steps

Try it on your own files:

```bash
python part3/document_qa.py ingest ~/notes --collection notes
python part3/document_qa.py ask "…" --collection notes
```
"""),
    code("""
qa.close()
shutil.rmtree(DB, ignore_errors=True)
"""),
]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    ci = {"CHUNK_SIZES": [400], "KS": [1, 3], "TOP_K": 2, "MAX_TOKENS": 24}
    print(write(NAME, CELLS, ci_parameters=ci))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
