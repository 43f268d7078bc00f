"""The demo language model, built by our own code: its corpus, training and export (build time only)."""
