"""omnitune: fine-tune Qwen multimodal models with plain PyTorch (FSDP2, DCP), MindSpeed-MM compatible."""
__version__ = "0.1.0"
