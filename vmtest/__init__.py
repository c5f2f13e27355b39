"""Boot Debian's Linux 7.3+ kernel under QEMU (via virtme-ng) to run wsd's kernel tests.

The host's root filesystem is shared read-only into the guest and the repository read-write,
so the guest runs the project's own ``.venv`` against a kernel with ``CONFIG_USERFAULTFD_RWP``.

Modules:
    apt     -- find the host's Debian mirror; pick the kernel packages (pure parsing)
    kernel  -- host prerequisites, kernel .deb cache, install into /lib/modules
    qemu    -- KVM/TCG decision, the vng command line, running a VM with a timeout
    session -- prepare the host, boot one guest command, interpret how it ended
    __main__ -- the ``python -m vmtest`` command line

See docs/vmtest.md.
"""

from __future__ import annotations

#: Exit status for failures of the VM machinery itself (kernel fetch, boot, timeout), as
#: opposed to the guest command's own status, which is passed through unchanged.  125 follows
#: ``docker run``; it stays clear of pytest's 0-5 and of the shell's 126/127/128+N.
EXIT_INFRA = 125

#: Exit status after Ctrl-C (128 + SIGINT), as a shell would report it.
EXIT_INTERRUPTED = 130


class InfraError(Exception):
    """The VM machinery failed; ``step`` names what was being done ("fetch kernel", ...)."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message
