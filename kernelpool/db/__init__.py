"""The store's two database backends (SQLite embedded, PostgreSQL for several replicas) and the
translation of the store's SQL between them, used by `kernelpool.store`; and the settings of the
database and of replicas (`settings.py`, part of `kernelpool.config.Settings`)."""
