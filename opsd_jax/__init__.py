"""opsd-jax: rationale-privileged on-policy self-distillation (OmniOPSD) for omni-modal models in JAX/Flax."""

__version__ = "0.1.0"
