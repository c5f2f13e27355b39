"""``wsd guest``: a synthetic VMM with a verified, configurable access workload.

It creates guest RAM the way a VMM does (a memfd mapped ``MAP_SHARED``, a raw
userfaultfd), hands both to a running wsd (docs/protocol.md), and then reads
and writes its memory from worker threads in C, checking every page it reads
against a self-verifying pattern.  The truth file records the exact hot set of
every phase, so tests can compare it with what wsd's tracker saw.

- :mod:`.cli`: the command line (``add_parser`` for ``wsd``'s subcommands);
- :mod:`.process`: :class:`GuestProcess`, to run a guest from a test;
- :mod:`.native`: the C access loop and how it is built and cached;
- :mod:`.workload`, :mod:`.hotset`, :mod:`.memory`: the pieces of a run.

See docs/guest.md.  The configuration is exported here; the rest is
imported from its module, so that ``wsd``'s parser loads no more than it.
"""

from .config import GuestConfig, HotSpec, Pattern, Thp, parse_hot, parse_size

__all__ = ["GuestConfig", "HotSpec", "Pattern", "Thp", "parse_hot", "parse_size"]
