"""Local LLM Lab: shared code for the course notebooks, scripts and server.

The usual path through the package::

    from llmlab import backends, registry
    spec = registry.resolve("smollm2-135m-instruct")   # a verified local file
    model = backends.load(spec)                         # llama.cpp, transformers or remote
    print(model.chat([{"role": "user", "content": "Hi!"}]).text)

Modules: ``registry`` (model catalog), ``backends`` (one interface, several engines; also
``chat(..., schema=...)`` for typed answers), ``structured`` (JSON schema and tool calls held
by grammars), ``tools`` (Python functions as tools, the tool loop), ``engine`` (batched
decoding), ``chat`` (sessions), ``rag`` (document QA), ``batch``, ``bench``, ``envcheck``.
"""

__version__ = "0.1.0"
