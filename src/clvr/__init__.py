"""clvr: closed-loop visual reasoning for text-to-image generation."""

__version__ = "0.1.0"
