"""The store: the versioned SQLite tuning database, its schema and migrations, merging databases
of several hosts, MetaSchedule records in, and where the default database lives."""
