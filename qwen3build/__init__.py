"""qwen3build: Hugging Face Qwen3 checkpoint -> split Core ML deployment."""
