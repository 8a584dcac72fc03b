"""The one thing pyproject.toml cannot say: the Alembic scripts stay at the repository's top
(``migrations/``) and ship inside the store's package as ``zoo_store.migrations``."""

from setuptools import find_packages, setup

MIGRATIONS = {"zoo_store.migrations": "migrations", "zoo_store.migrations.versions": "migrations/versions"}

setup(packages=find_packages(include=["service*", "zoo_store*"]) + list(MIGRATIONS), package_dir=MIGRATIONS)
