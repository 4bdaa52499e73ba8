"""Watching migrations from outside the engine: kernel probes (BPF through bcc, or tracefs)."""
