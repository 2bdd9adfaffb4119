"""On-policy self-distillation: prompts, teacher scoring, divergence losses, the train step and the EMA teacher."""
