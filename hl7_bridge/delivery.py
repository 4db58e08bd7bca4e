"""Results delivered as ORU^R01 over MLLP, reliably (docs/delivery.md): the results queue and its senders.

``hl7_bridge.results_queue`` turns each second-opinion report version into one stored message per
destination; ``hl7_bridge.sender`` sends each destination's queue, oldest first, and judges the
ACK; ``hl7_bridge.delivery_status`` shows where delivery stands on the case. ``Delivery`` is the
two configured together on one database: one queueing loop and one sending loop per destination.
"""

from collections.abc import Sequence
from datetime import timedelta

from fhir_server import outbox
from fhir_server.executor import Executor
from fhir_server.outbox import Backoff
from fhir_server.outbox_worker import Loop
from fhir_server.repository import Hook
from hl7_bridge.intake import Senders
from hl7_bridge.outbound import DestinationConfig
from hl7_bridge.results_queue import ResultsQueue
from hl7_bridge.sender import Sender

#: An EHR's MLLP receiver is retried for about 3 hours: 5 s doubling to 10 min, 24 times.
DEFAULT_BACKOFF = Backoff(24, timedelta(seconds=5), timedelta(minutes=10))


class Delivery:
    """The results queue and a sender per destination, on one database."""

    def __init__(
        self,
        executor: Executor,
        destinations: Sequence[DestinationConfig],
        backoff: Backoff = DEFAULT_BACKOFF,
        hooks: Sequence[Hook] = (),
        senders: Senders | None = None,
        lease: timedelta = outbox.LEASE,
        poll: float = 1.0,
    ) -> None:
        self.queue = ResultsQueue(executor, destinations, backoff, hooks, senders, lease, poll)
        self.senders = {d.name: Sender(executor, d, backoff, hooks, lease, poll) for d in destinations}

    @property
    def loops(self) -> list[Loop]:
        """The queueing loop, then each destination's sending loop."""
        return [self.queue.loop, *(sender.loop for sender in self.senders.values())]

    def queue_once(self) -> int:
        """Queue the messages of the due results; how many results there were."""
        return self.queue.run_once()

    def send_once(self, name: str) -> bool:
        """Send the head of destination ``name``'s queue if it is due; False when there was nothing to send."""
        return self.senders[name].send_once()
