"""Mode selection and the kernel-info report, from fake probe results."""

from __future__ import annotations

import dataclasses
import json

import pytest

from wsd import kernel_info
from wsd.kernel import FeatureUnavailable, KernelFeatures, RegisterMode, RegisterProbe
from wsd.kernel.uffd import Feature, Ioctl
from wsd.tracker.mode import TrackingMode, choose_mode

BASE_FEATURES = (
    Feature.WP_ASYNC
    | Feature.WP_HUGETLBFS_SHMEM
    | Feature.MISSING_SHMEM
    | Feature.MINOR_SHMEM
    | Feature.EVENT_REMOVE
)
HOST_618 = KernelFeatures(
    release="6.18.0",
    features=BASE_FEATURES,
    ioctls=Ioctl.API | Ioctl.REGISTER | Ioctl.UNREGISTER,
    pagemap_scan=True,
    pagemap_accessed=False,
    thp_shmem_enabled="never",
    register=(RegisterProbe("shmem", RegisterMode.RWP, False, "EINVAL"),),
)
LINUX_73 = dataclasses.replace(
    HOST_618,
    release="7.3.0",
    features=BASE_FEATURES | Feature.RWP | Feature.RWP_ASYNC,
    ioctls=HOST_618.ioctls | Ioctl.SET_MODE,
    pagemap_accessed=True,
    thp_shmem_enabled="always",
    register=(RegisterProbe("shmem", RegisterMode.RWP | RegisterMode.MISSING, True),),
)


def test_rwp_kernel_picks_rwp() -> None:
    d = choose_mode(LINUX_73)
    assert d.mode is TrackingMode.RWP and d.register_mode == RegisterMode.RWP | RegisterMode.MISSING
    assert d.limitations == ()


def test_pre_73_kernel_falls_back_and_says_why() -> None:
    d = choose_mode(HOST_618)
    assert d.mode is TrackingMode.WP_ASYNC
    assert "RWP, RWP_ASYNC" in d.rejected["rwp"] and "Linux 7.3" in d.rejected["rwp"]
    assert any("writes only" in lim for lim in d.limitations)


def test_forcing_wp_async_on_73() -> None:
    assert choose_mode(LINUX_73, prefer=TrackingMode.WP_ASYNC).mode is TrackingMode.WP_ASYNC


def test_forcing_rwp_on_old_kernel_fails_clearly() -> None:
    with pytest.raises(FeatureUnavailable, match="rwp: missing uffd features RWP"):
        choose_mode(HOST_618, prefer=TrackingMode.RWP)


def test_kernel_without_pagemap_scan_has_no_mode() -> None:
    old = dataclasses.replace(
        HOST_618, features=Feature.MISSING_SHMEM, pagemap_scan=False, pagemap_error="ENOTTY"
    )
    with pytest.raises(FeatureUnavailable, match=r"Linux 6\.7"):
        choose_mode(old)
    assert json.loads(json.dumps(kernel_info.as_json(old)))["tracking_mode"] is None
    assert "tracking mode          none" in kernel_info.as_text(old)


def test_rwp_blocked_when_registration_probe_failed() -> None:
    broken = dataclasses.replace(
        LINUX_73,
        register=(
            RegisterProbe("shmem", RegisterMode.RWP | RegisterMode.MISSING, False, "EINVAL"),
        ),
    )
    assert choose_mode(broken).mode is TrackingMode.WP_ASYNC


def test_report_text_and_json() -> None:
    text = kernel_info.as_text(LINUX_73)
    assert "tracking mode          rwp" in text
    assert "shmem THP is on" in text
    info = kernel_info.as_json(HOST_618)
    assert info["tracking_mode"] == "wp-async"
    assert info["kernel"]["features"][0] == "EVENT_REMOVE"
    assert "rwp" in info["rejected_modes"]
