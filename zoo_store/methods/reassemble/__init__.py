from zoo_store.methods.reassemble.method import Reassemble

__all__ = ["Reassemble"]
