"""Generative adversarial negatives: a Qwen2 decoder in JAX, prompts, checks, a rules backend, the subprocess."""
