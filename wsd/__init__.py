"""wsd: a working-set tracking daemon for virtual machine monitors."""

__version__ = "0.1.0"
