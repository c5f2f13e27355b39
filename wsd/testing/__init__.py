"""Test doubles that exercise the real kernel: a puppet VMM process."""
