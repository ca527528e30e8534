"""Alembic environment for the gateway's schema.

`tokenmill.gateway.store.upgrade_schema` runs the migrations on a connection it
has already opened (and locked); that connection arrives in
`config.attributes["connection"]`. Offline (SQL script) mode is not supported.
"""
from alembic import context

from tokenmill.gateway.store import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("run the gateway's migrations through tokenmill.gateway.store.upgrade_schema")

context.configure(connection=connection, version_table=VERSION_TABLE, render_as_batch=True,
                  transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
