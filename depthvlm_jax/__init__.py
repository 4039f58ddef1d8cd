"""DepthVLM in JAX/Flax: a Qwen3-VL vision-language model with a DPT metric-depth head."""
