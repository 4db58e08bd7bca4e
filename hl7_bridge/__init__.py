"""HL7 v2 bridge: MLLP listener and sender, ACKs, inbound message store, v2 outbound queue."""
