"""The Orthanc fixtures (``testbed.orthanc``): one Orthanc per module, only in a private network namespace."""

from collections.abc import Iterator

import pytest

from testbed.orthanc import Modalities, Orthanc, in_private_netns


@pytest.fixture(scope="module")
def orthanc_modalities() -> Modalities:
    """The ``DicomModalities`` of the module's Orthanc; override it in a test module."""
    return {}


@pytest.fixture(scope="module")
def orthanc(orthanc_modalities: Modalities, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A running Orthanc for the module (skips outside a private network namespace)."""
    if not in_private_netns():
        pytest.skip("Orthanc listens on all interfaces: run in a private network namespace (tests/run)")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), orthanc_modalities)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc_empty(orthanc: Orthanc) -> Orthanc:
    """The module's Orthanc, running and emptied."""
    orthanc.start()
    orthanc.clear()
    return orthanc
