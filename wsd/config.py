"""The daemon's TOML configuration: one pydantic model tree, ``extra="forbid"`` throughout.

``config.example.toml`` documents every key; ``tests/unit/test_config.py`` loads it.
Errors name the file, the key (dotted path), the value and what was wrong.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wsd.access import AccessConfig
from wsd.evictor import EvictorConfig
from wsd.logs import LogFormat, LogLevel
from wsd.storage import StorageConfig
from wsd.tracker import TrackingMode
from wsd.vmm.limits import HandoffLimits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonSection(_Strict):
    socket: Path = Path("/run/wsd/wsd.sock")
    """Where VMMs hand off guest memory (a UNIX socket, mode 0600)."""
    control_socket: Path = Path("/run/wsd/control.sock")
    """Where ``wsd status`` and ``wsd vm ...`` reach the daemon (a UNIX socket, mode 0600)."""
    interval_seconds: float = Field(default=1.0, gt=0, le=3600)
    """The tracking interval: one scan (and one eviction window) per interval."""
    mode: TrackingMode | None = None
    """Force a tracking mode; unset picks the best this kernel supports."""
    state_dir: Path | None = Path("/var/lib/wsd")
    """Where page maps are persisted; unset keeps them in memory only."""
    log_format: LogFormat = LogFormat.AUTO
    """``json`` lines, ``console`` text, or ``auto``: console on a terminal, else JSON."""
    log_level: LogLevel = LogLevel.INFO
    """Events below this level are dropped."""


class MetricsSection(_Strict):
    enabled: bool = True
    """Serve Prometheus metrics over HTTP."""
    address: str = "127.0.0.1:9466"
    """``host:port`` to listen on (``[::1]:9466`` for IPv6); port 0 picks a free one."""

    @field_validator("address")
    @classmethod
    def _host_port(cls, v: str) -> str:
        split_address(v)
        return v

    @property
    def host(self) -> str:
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        return split_address(self.address)[1]


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) as ``(host, port)``; ValueError says what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError("must be host:port, such as 127.0.0.1:9466 or [::1]:9466")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 host must be in brackets, such as [::1]:9466")
    if not host:
        raise ValueError("the host is empty")
    if not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} must be a number from 0 to 65535")
    return host, int(port)


class VmOverride(_Strict):
    """Settings for one VM, matched by its ``vm_id``; unset keys keep the global value."""

    evictor: dict[str, Any] = Field(default_factory=dict)


class WsdConfig(_Strict):
    daemon: DaemonSection = Field(default_factory=DaemonSection)
    storage: StorageConfig | None = None
    """Where evicted pages go; without it wsd tracks but never evicts."""
    evictor: EvictorConfig = Field(default_factory=EvictorConfig)
    vm: dict[str, VmOverride] = Field(default_factory=dict)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    access: AccessConfig = Field(default_factory=AccessConfig)
    """Who may connect to wsd's sockets."""
    limits: HandoffLimits = Field(default_factory=HandoffLimits)
    """How much hand-off clients may ask for: time, connections, sessions, memory."""

    def evictor_for(self, vm_id: str) -> EvictorConfig:
        """The evictor settings of one VM: the global table with its overrides applied."""
        override = self.vm.get(vm_id)
        if override is None or not override.evictor:
            return self.evictor
        return EvictorConfig.model_validate(
            {**self.evictor.model_dump(exclude_unset=True), **override.evictor}
        )


class ConfigError(Exception):
    """A configuration file that cannot be used; the message says where and why."""


def load(path: Path) -> WsdConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    return parse(text, source=str(path))


def parse(text: str, *, source: str = "<config>") -> WsdConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from e
    try:
        config = WsdConfig.model_validate(data)
        for vm_id in config.vm:
            config.evictor_for(vm_id)  # an override must make a valid whole
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e)}") from e
    return config


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = item["loc"]
        key = ".".join(str(p) for i, p in enumerate(loc) if not _is_union_tag(loc, i))
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key `{key}`")
        elif item["type"] == "missing":
            lines.append(f"`{key}` is required")
        else:
            lines.append(f"`{key}` = {item.get('input')!r}: {msg}")
    title = f"{len(lines)} error{'s' if len(lines) > 1 else ''}"
    return title + "\n  " + "\n  ".join(lines)


_TAGS = frozenset({"file", "zstd", "redis", "tiered"})


def _is_union_tag(loc: tuple[int | str, ...], i: int) -> bool:
    """Whether ``loc[i]`` is the ``kind`` pydantic inserts into the location of an
    error inside a tagged union member (``storage.file.root``): not a key of the file."""
    if i == 0 or loc[i] not in _TAGS:
        return False
    before = loc[i - 1]
    return before == "storage" or (isinstance(before, int) and loc[i - 2 : i - 1] == ("tiers",))
