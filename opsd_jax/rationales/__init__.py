"""Rationales written once by a frontier model behind an OpenAI-compatible endpoint."""
