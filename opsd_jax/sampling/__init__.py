"""Student sampling: prefill, jitted decode loop over a static KV cache, sampling filters."""

from opsd_jax.sampling.sampler import GenerationOutput, bucket_length, generate, pad_prompts

__all__ = ["GenerationOutput", "bucket_length", "generate", "pad_prompts"]
