"""The VMM side of wsd: the hand-off protocol, its server and a client."""
