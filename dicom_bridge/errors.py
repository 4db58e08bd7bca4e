"""What can go wrong talking to a PACS, whichever door (DIMSE or DICOMweb) was used.

The job that links images (docs/image-linking.md) retries with backoff on
:class:`PacsUnavailable` and on a study not there yet; it never loses the case.
"""


class PacsError(Exception):
    """The PACS answered, but not as the standard says (or refused the request)."""


class PacsUnavailable(PacsError):
    """The peer is down or unreachable (refused, timed out, 5xx, aborted): retry later."""


class RetrieveFailed(PacsError):
    """A retrieve (C-MOVE, C-GET, WADO-RS) did not deliver the study."""


class MoveDestinationUnknown(RetrieveFailed):
    """The PACS does not know our C-MOVE destination AE (PS3.4 C.4.2.1.5: status 0xA801)."""
