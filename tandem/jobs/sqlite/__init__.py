"""The embedded job store: one SQLite file in WAL mode, durable on every commit.

- `store`: the JobStore, on a thread of its own that owns the connection;
- `schema`: the tables, and how a file an earlier version made is brought up to date;
- `upkeep`: what keeps the file within bounds: its WAL, moved into the database file and
  started over, and the pages finished jobs free, given back to the file system.
"""

from tandem.jobs.sqlite.schema import check_database
from tandem.jobs.sqlite.store import SQLiteJobStore
from tandem.jobs.sqlite.upkeep import MIB

__all__ = ["MIB", "SQLiteJobStore", "check_database"]
