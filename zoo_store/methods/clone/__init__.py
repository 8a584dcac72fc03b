"""Partial Network Cloning (PNC, CVPR 2023): docs/methods/clone.md."""

from zoo_store.methods.clone.method import Clone

__all__ = ["Clone"]
