"""Free ports for listeners started by the tests and the benchmarks."""

import socket


def free_port() -> int:
    """A port nobody listens on at 127.0.0.1 now (tests run in parallel: never a fixed one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
