from zoo_store.archs import small, tv  # noqa: F401  (registers the architectures)
from zoo_store.archs.base import FLATTEN, Stage, Tap, TapNet
from zoo_store.archs.registry import arch_names, build_arch, build_for, register_arch

__all__ = ["FLATTEN", "Stage", "Tap", "TapNet", "arch_names", "build_arch", "build_for", "register_arch"]
