"""Fine-tuning the lab's model with LoRA, measuring it, and taking it back to llama.cpp.

The command is ``python part4/fine_tune.py``; notebook ``10_Fine_Tuning`` walks through it.
The modules, in the order a run uses them:

- ``data``: read and check a JSONL chat split (bad lines reported by number), tokenize it
- ``train``: the base model through transformers, PEFT LoRA layers, a resumable training loop
- ``evaluate``: the task's metric (a JSON reply with the answer and its source file), scored
  greedy replies of any backend, agreement between two models
- ``export_gguf``: the adapter as a GGUF LoRA file for llama.cpp, and merged into the base
  GGUF, quantized and registered as ``<model>:<name>``
- ``adapters``: which base model an adapter was made for; refusing it on any other

Nothing heavy is imported here, so ``from llmlab.finetune import adapters`` stays cheap.
"""
