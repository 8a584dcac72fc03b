"""Partial Network Cloning (PNC, CVPR 2023): SPEC section 3.1 and docs/methods/clone.md."""

from zoo_store.methods.clone.method import Clone

__all__ = ["Clone"]
