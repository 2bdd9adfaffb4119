"""Side-by-side measurements against the PyTorch reference (scripts that print a table and write JSON)."""
