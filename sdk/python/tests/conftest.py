"""Fixtures: one live `tally` for the whole run (binary from TALLY_BIN, default
<repo>/target/debug/tally), stopped at the end."""

from typing import Iterator

import pytest

from support import TallyProcess, tally_binary


@pytest.fixture(scope="session")
def tally() -> Iterator[TallyProcess]:
    binary = tally_binary()
    if not binary.exists():
        raise RuntimeError(f"no tally binary at {binary}: build it with `cargo build --bin tally` or set TALLY_BIN")
    server = TallyProcess(binary)
    try:
        yield server
    finally:
        server.stop()
