"""RWP-FACTS "uAPI": the probe sequence, feature bits and SET_MODE rules."""

from __future__ import annotations

import errno
import json

import pytest

from wsd.kernel import Feature, Ioctl, KernelError, Userfaultfd, probe_kernel
from wsd.testing.running import wsd_cli
from wsd.tracker.mode import TrackingMode, choose_mode


def test_probe_reports_rwp(rwp_supported: Feature) -> None:
    assert Feature.RWP in rwp_supported and Feature.RWP_ASYNC in rwp_supported
    k = probe_kernel()
    assert k.pagemap_accessed, "PAGE_IS_ACCESSED unknown to PAGEMAP_SCAN"
    assert Ioctl.SET_MODE in k.ioctls
    assert choose_mode(k).mode is TrackingMode.RWP


def test_kernel_info_cli_names_rwp(rwp_supported: Feature) -> None:
    info = json.loads(wsd_cli("kernel-info", "--json"))
    assert info["tracking_mode"] == "rwp"
    assert "RWP" in info["kernel"]["features"]


def test_rwp_async_without_rwp_is_einval(rwp_supported: Feature) -> None:
    with Userfaultfd.create() as uffd, pytest.raises(KernelError) as exc:
        uffd.api(Feature.RWP_ASYNC)
    assert exc.value.errno == errno.EINVAL and exc.value.op == "UFFDIO_API"


def test_second_api_call_is_einval(rwp_supported: Feature) -> None:
    with Userfaultfd.create() as uffd:
        uffd.api(Feature.RWP | Feature.RWP_ASYNC)
        with pytest.raises(KernelError) as exc:
            uffd.api(Feature.RWP | Feature.RWP_ASYNC)
    assert exc.value.errno == errno.EINVAL


def test_set_mode_toggles_rwp_async_only(rwp_supported: Feature) -> None:
    with Userfaultfd.create() as uffd:
        uffd.api(Feature.RWP | Feature.RWP_ASYNC)
        uffd.set_mode(disable=Feature.RWP_ASYNC)
        uffd.set_mode(enable=Feature.RWP_ASYNC)
        with pytest.raises(KernelError) as both:
            uffd.set_mode(enable=Feature.RWP_ASYNC, disable=Feature.RWP_ASYNC)
        assert both.value.errno == errno.EINVAL
        with pytest.raises(KernelError) as wp:
            uffd.set_mode(disable=Feature.WP_ASYNC)
        assert wp.value.errno == errno.EINVAL
