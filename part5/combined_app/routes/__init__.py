"""The app's routes, one module per area: system (health, metrics), openai_api,
documents, batches, lora (the LoRA adapters loaded)."""
