from alembic import context

from zoo_store.store.db import Base

config = context.config
target_metadata = Base.metadata

connection = config.attributes.get("connection")
if connection is None:
    from sqlalchemy import create_engine

    url = config.attributes.get("connection_url") or config.get_main_option("sqlalchemy.url")
    with create_engine(url).begin() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
