"""anchorkd: KL-anchored fine-tuning of Qwen3-VL on ms-swift."""

__version__ = "0.1.0"
