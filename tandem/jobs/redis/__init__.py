"""The distributed job store, on Redis Streams.

- `store`: the JobStore: its keys, its connection, its handling of a Redis that is away or
  refuses writes;
- `scripts`: the Lua scripts, one for each change of a job's state;
- `connect`: how the store reaches Redis: a pool of connections to the URL's server, or to
  the primary that Sentinel names;
- `url`: a Redis URL checked before anything connects.
"""

from tandem.jobs.redis.store import RedisJobStore, Replication, connection_name, refuses_writes

__all__ = ["RedisJobStore", "Replication", "connection_name", "refuses_writes"]
