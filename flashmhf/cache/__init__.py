"""The SQLite store of tuning results (sqlite-utils): schema, writes, lookup and management."""
