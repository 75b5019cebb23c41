"""Gradio UI: one module per tab, each built from plain callables (no model code here)."""
