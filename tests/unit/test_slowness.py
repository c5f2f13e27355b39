import pytest

from wsd.testing.slowness import GUEST_ENV_VAR, VM_TIME_SCALE, in_test_vm, patient


def test_waits_are_as_long_as_a_host_needs_outside_the_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GUEST_ENV_VAR, raising=False)
    assert not in_test_vm()
    assert patient(30) == 30


def test_waits_are_longer_in_the_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GUEST_ENV_VAR, "1")
    assert in_test_vm()
    assert patient(30) == 30 * VM_TIME_SCALE
