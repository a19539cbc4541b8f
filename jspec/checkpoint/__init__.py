"""Reading and writing models: Hugging Face directories (safetensors, config.json, tokenizer.json) and orbax."""
