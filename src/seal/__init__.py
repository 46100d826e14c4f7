"""seal: Self-Adapting Language Models (SEAL) — self-edits, the LoRA inner loop, and ReST-EM."""

__version__ = "0.1.0"
