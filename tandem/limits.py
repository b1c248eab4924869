"""The serving process's limit on open files, raised to what its guards let in."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("tandem.limits")

# Files a proxy holds beside the connections its guards count: the store's database, WAL and
# shared memory, the models, Redis connections, keep-alive connections between requests.
BESIDE_GUARDS = 256


def open_files_for(connections: int) -> int:
    """Raise the soft limit on open files to the hard one, and warn if it is still under
    `connections` and BESIDE_GUARDS; return it. At the common soft limit of 1024, 1000 event
    streams (TANDEM_MAX_WATCHES' default) used every file: new connections were reset,
    /health's included, and the guard's 503 never came."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # a sandbox that forbids it: warn below
            log.debug("the open files limit stays at %d: %s", soft, exc)
    needed = connections + BESIDE_GUARDS
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "this process may open %d files, under the %d that TANDEM_MAX_WATCHES and"
            " TANDEM_MAX_IN_FLIGHT let in: past it new connections are reset, /health's too;"
            " raise the limit (ulimit -n, systemd's LimitNOFILE) or lower those settings",
            soft,
            needed,
        )
    return soft
