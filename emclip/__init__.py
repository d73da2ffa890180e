"""emclip: scale-aware multiple-instance vision-language contrastive learning for electron microscopy."""

__version__ = "0.1.0"
