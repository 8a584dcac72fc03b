from zoo_store.methods.resample.method import Resample

__all__ = ["Resample"]
