"""salt_ref: the reference implementation of Salt (SC-DMD + cache-aware training)."""

__version__ = "0.1.0"
