"""Checkpoints: official tensor names and layout, strict loading and saving, hub resolution, device placement, random init."""
