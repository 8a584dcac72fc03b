"""Partial Network Cloning (PNC, CVPR 2023): SPEC section 3.1. Being built step by step (issue 3):
the plan (target, sources, labels) and the localization of the source filters are done; the
insertion search, the path and the registered method come next."""
