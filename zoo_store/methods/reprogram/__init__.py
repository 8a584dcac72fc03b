from zoo_store.methods.reprogram.method import Reprogram

__all__ = ["Reprogram"]
