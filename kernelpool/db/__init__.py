"""The store's two database backends (SQLite embedded, PostgreSQL for several replicas) and the
translation of the store's SQL between them. Used by `kernelpool.store` only."""
