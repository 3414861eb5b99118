"""Text generation: the backends (transformers, vLLM), the engines' lifetime, the paraphraser
and the translator."""
