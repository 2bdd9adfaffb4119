"""MER-UniBench evaluation: emotion-wheel normalisation, label extraction, the benchmark's metrics,
scoring of saved predictions and the report. See opsd_jax/eval/predictions.py for the file schema."""
