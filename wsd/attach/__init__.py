"""``wsd attach``: adopt an unmodified, running QEMU with memfd-backed guest RAM.

``discover`` reads ``/proc`` for the guest RAM, ``inject`` makes QEMU create a
userfaultfd (ptrace, x86_64), ``adopt`` takes the fds and hands them to wsd,
``cli`` is the command.
"""
