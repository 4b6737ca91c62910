"""Open files: the soft limit raised to the hard one at start, and the connection cap that
the limit allows (each proxied request may hold two descriptors: its client's connection
and one to the upstream)."""

from __future__ import annotations

from typing import Protocol

from twisted.logger import Logger

try:
    import resource as _resource
except ImportError:  # Windows: no rlimits
    _resource = None  # type: ignore[assignment]

log = Logger()

MAX_CONNECTIONS = 4096  # a listener's connections in all, when open files allow as many
FDS_PER_CONNECTION = 2  # a client's connection and its upstream's
FD_RESERVE = 64  # for listening and discovery sockets, health checks, the log file...
UNLIMITED_TARGET = 65536  # the soft limit asked for when the hard one is unlimited (macOS)


class RLimits(Protocol):
    """What we use of the resource module (a fake in tests)."""

    RLIMIT_NOFILE: int
    RLIM_INFINITY: int

    def getrlimit(self, resource: int, /) -> tuple[int, int]: ...

    def setrlimit(self, resource: int, limits: tuple[int, int], /) -> None: ...


def soft_limit_target(soft: int, hard: int, infinity: int) -> int:
    """The soft limit of open files to ask for: the hard one (a chosen number where that is
    unlimited), never less than the soft one."""
    if soft == infinity:
        return soft
    target = UNLIMITED_TARGET if hard == infinity else hard
    return max(soft, target)


def connection_cap(open_files: int | None, most: int = MAX_CONNECTIONS) -> int:
    """The most connections a listener may hold when open_files descriptors are allowed
    (None: no limit): two each after a reserve, at most ``most`` and at least one."""
    if open_files is None:
        return most
    return max(1, min(most, (open_files - FD_RESERVE) // FDS_PER_CONNECTION))


def open_files_cap(resource: RLimits | None = _resource) -> int:
    """connection_cap() of this process's soft limit of open files, as it is now."""
    if resource is None:
        return MAX_CONNECTIONS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return connection_cap(None if soft == resource.RLIM_INFINITY else soft)


def raise_open_files(resource: RLimits | None = _resource) -> int | None:
    """Raise the soft limit of open files to the hard one and say so (once, with the
    numbers), and say when the limit caps connections below MAX_CONNECTIONS. The soft
    limit in force (None: no rlimits here); failures are logged, never raised."""
    if resource is None:
        return None
    infinity = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = soft_limit_target(soft, hard, infinity)
    if target == soft:
        log.info("Open files: {soft} allowed", soft=_number(soft, infinity))
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:  # ValueError: more than the kernel allows
            error = getattr(e, "strerror", None) or str(e)
            log.warn("Open files: cannot raise the limit from {soft} to {target}: {error}",
                     soft=soft, target=target, error=error)  # fmt: skip
        else:
            log.info("Open files: limit raised from {soft} to {target} (hard limit: {hard})",
                     soft=soft, target=target, hard=_number(hard, infinity))  # fmt: skip
            soft = target
    cap = connection_cap(None if soft == infinity else soft)
    if cap < MAX_CONNECTIONS:
        log.warn(
            "At most {cap} connections in all, not {most}: {soft} open files allowed, two "
            "for each proxied request (raise the hard limit: LimitNOFILE=, ulimit -Hn)",
            cap=cap, most=MAX_CONNECTIONS, soft=soft,
        )  # fmt: skip
    return soft


def _number(limit: int, infinity: int) -> str:
    return "unlimited" if limit == infinity else str(limit)
