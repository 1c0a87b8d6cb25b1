"""emorl: ensemble multi-objective RL fine-tuning of language models (EMORL, Kong et al., SIGDIAL 2025)."""

__version__ = "0.1.0"
