"""The TOML configuration: the shipped example loads, and errors say where and what."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsd import config
from wsd.daemon import Settings
from wsd.evictor import EvictorConfig
from wsd.storage import FileStoreConfig

EXAMPLE = Path(__file__).parents[2] / "config.example.toml"


def test_the_example_loads_and_matches_the_defaults() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg.evictor == EvictorConfig()
    assert isinstance(cfg.storage, FileStoreConfig)
    assert cfg.storage.root == Path("/var/lib/wsd/pages")
    assert cfg.daemon == config.DaemonSection()
    assert cfg.metrics == config.MetricsSection()
    assert (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 9466)


def test_every_documented_evictor_key_is_a_field() -> None:
    keys = {
        line.split("=")[0].strip("# ").strip()
        for line in EXAMPLE.read_text().split("[evictor]")[1].split("[vm.")[0].splitlines()
        if ("=" in line and not line.startswith("# ")) or (line.startswith("# ") and " = " in line)
    }
    keys = {k for k in keys if k.isidentifier()}
    assert keys == set(EvictorConfig.model_fields), keys ^ set(EvictorConfig.model_fields)


def test_an_empty_file_is_a_tracking_only_daemon() -> None:
    cfg = config.parse("")
    assert cfg.storage is None and Settings.from_config(cfg).storage is None


def test_per_vm_overrides_apply_to_that_vm_only() -> None:
    cfg = config.parse(
        """
        [evictor]
        min_idle_cycles = 4
        [vm."db".evictor]
        min_idle_cycles = 60
        max_idle_cycles = 200
        """
    )
    settings = Settings.from_config(cfg)
    assert settings.evictor_for("db").min_idle_cycles == 60
    assert settings.evictor_for("db").max_idle_cycles == 200
    assert settings.evictor_for("web").min_idle_cycles == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[evictor]\nmin_idle_cycle = 3\n", "unknown key `evictor.min_idle_cycle`"),
        (
            "[evictor]\nmin_idle_cycles = 0\n",
            "`evictor.min_idle_cycles` = 0: Input should be greater than or equal to 1",
        ),
        ("[daemon]\ninterval_seconds = 'often'\n", "`daemon.interval_seconds` = 'often'"),
        (
            '[storage]\nkind = "file"\nroot = "relative"\n',
            "`root` must be an absolute path, got 'relative'",
        ),
        ('[storage]\nkind = "file"\n', "`storage.root` is required"),
        ('[storage]\nkind = "floppy"\n', "`storage` = {'kind': 'floppy'}"),
        (
            '[vm."db".evictor]\nmax_idle_cycles = 2\n',
            "max_idle_cycles (2) is below min_idle_cycles (8)",
        ),
        ("[evictor\n", "not valid TOML"),
        (
            '[metrics]\naddress = "9466"\n',
            "`metrics.address` = '9466': Value error, must be host:port",
        ),
        ('[metrics]\naddress = "localhost:http"\n', "port 'http' must be a number"),
        ('[metrics]\naddress = "::1:9466"\n', "an IPv6 host must be in brackets"),
        ("[metrics]\nport = 9466\n", "unknown key `metrics.port`"),
    ],
)
def test_errors_name_the_file_key_and_value(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, source="/etc/wsd/wsd.toml")
    assert str(info.value).startswith("/etc/wsd/wsd.toml: ")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.1:9466", "127.0.0.1", 9466),
        ("[::1]:0", "::1", 0),
        ("wsd.local:65535", "wsd.local", 65535),
    ],
)
def test_the_metrics_address_splits_into_host_and_port(address: str, host: str, port: int) -> None:
    metrics = config.parse(f'[metrics]\naddress = "{address}"\n').metrics
    assert (metrics.host, metrics.port) == (host, port)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"nope\.toml: cannot read"):
        config.load(tmp_path / "nope.toml")
