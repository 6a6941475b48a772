"""The vision tower (MoonViT-style), projector and the VLM wrapper."""
