"""Host prerequisites and the test kernel: fetch once into a cache, install into /lib/modules.

Cache layout (``${XDG_CACHE_HOME:-~/.cache}/wsd/vmtest``, or ``$WSD_VMTEST_CACHE``), outside
the repository so every clone on the machine shares one download::

    apt/                    private apt state (sources.list, lists/, archives/); host apt untouched
    debs/<abi>_<version>/   the three .debs, plus stamp.json naming them with their sizes
    kernel.json             which <abi>/<version> is current; reused until ``ensure --refresh``
    ensure.lock             serialises concurrent ensure steps (vmtest.session.prepare)
    kvm.json                KVM verdict learnt from a failed boot (see vmtest.qemu)
    runs/                   per-run scratch directories shared with the guest

The install goes to ``/lib/modules/<abi>/`` (vmlinuz, config, System.map, kernel/...) with a
``.wsd-vmtest.json`` stamp written last, so an interrupted install is redone next time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmtest import InfraError
from vmtest.apt import (
    KERNEL_SUITES,
    PACKAGE_TEMPLATES,
    choose_kernel_abi,
    choose_version,
    find_debian_mirror,
    parse_madison,
    private_sources_list,
)

Log = Callable[[str], None]

#: Debian packages the VM needs on the host.  Without busybox there is no initramfs, without
#: kmod no modprobe, and without udev the guest's stdout and exit status are lost (rc 255).
HOST_PACKAGES = ("qemu-system-x86", "busybox-static", "kmod", "udev")

MODULES_ROOT = Path("/lib/modules")
INSTALL_STAMP = ".wsd-vmtest.json"

ENV_CACHE = "WSD_VMTEST_CACHE"
ENV_ABI = "WSD_VMTEST_KERNEL_ABI"
ENV_VERSION = "WSD_VMTEST_KERNEL_PKG_VERSION"


@dataclass(frozen=True)
class Layout:
    """Where things live: the repository, the cache, the venv, the modules tree."""

    repo: Path
    cache: Path
    python: Path
    modules_root: Path = MODULES_ROOT

    @property
    def venv_bin(self) -> Path:
        return self.python.parent

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Layout:
        if env.get(ENV_CACHE):
            cache = Path(env[ENV_CACHE])
        else:
            xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            cache = Path(xdg) / "wsd" / "vmtest"
        # sys.executable is not resolved: .venv/bin/python must stay a venv path in the guest.
        return cls(
            repo=Path(__file__).resolve().parent.parent,
            cache=cache.absolute(),
            python=Path(sys.executable).absolute(),
        )


@dataclass(frozen=True)
class KernelDebs:
    """One fetched kernel: ABI name (``7.3-amd64``), package version, and its .deb files."""

    abi: str
    version: str
    debs: tuple[Path, ...]

    @property
    def label(self) -> str:
        return f"kernel {self.abi} ({self.version})"


def _run(step: str, cmd: Sequence[str], cwd: Path | None = None) -> str:
    """Run a host command; on failure raise InfraError naming ``step`` with its stderr tail."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise InfraError(step, f"{cmd[0]} not found") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise InfraError(step, f"`{' '.join(cmd)}` exited {proc.returncode}:\n{tail}")
    return proc.stdout


# --- host prerequisites -------------------------------------------------------------------


def missing_packages(names: Iterable[str]) -> list[str]:
    """Debian packages among ``names`` that are not installed (one dpkg-query call)."""
    wanted = list(names)
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *wanted],
        capture_output=True,
        text=True,
        check=False,
    )
    installed = {
        line.split()[0] for line in proc.stdout.splitlines() if line.endswith(" installed")
    }
    return [n for n in wanted if n not in installed]


def ensure_host_packages(log: Log) -> None:
    missing = missing_packages(HOST_PACKAGES)
    if not missing:
        log(f"host packages: ok ({' '.join(HOST_PACKAGES)})")
        return
    if os.geteuid() != 0:
        raise InfraError(
            "host packages",
            f"missing {' '.join(missing)}; run tools/bootstrap.sh as root (or apt-get install)",
        )
    log(f"host packages: installing {' '.join(missing)}")
    _run("apt-get update", ["apt-get", "update", "-q"])
    _run(
        "apt-get install",
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
    )


def find_vng(layout: Layout, log: Log | None = None) -> Path:
    """The virtme-ng front end installed in the same venv as this interpreter."""
    vng = layout.venv_bin / "vng"
    if not (os.access(vng, os.X_OK) and (layout.venv_bin / "virtme-run").exists()):
        raise InfraError(
            "find vng",
            f"{vng} (virtme-ng) is missing; run tools/bootstrap.sh to install the venv",
        )
    if log is not None:
        log(f"vng: {vng}")
    return vng


# --- fetching the .debs -------------------------------------------------------------------


class PrivateApt:
    """apt-get/apt-cache with their own sources and state under ``root``; no locks taken."""

    def __init__(self, root: Path, mirror: str) -> None:
        self.root = root
        self.mirror = mirror
        for sub in ("lists/partial", "cache/archives/partial"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        sources = root / "sources.list"
        sources.write_text(private_sources_list(mirror))
        self.options = [
            f"-oDir::Etc::SourceList={sources}",
            "-oDir::Etc::SourceParts=/dev/null",
            "-oDir::Etc::Preferences=/dev/null",
            "-oDir::Etc::PreferencesParts=/dev/null",
            f"-oDir::State::Lists={root / 'lists'}",
            f"-oDir::Cache={root / 'cache'}",
            "-oDir::State::status=/dev/null",
            "-oDebug::NoLocking=1",
        ]
        if os.geteuid() == 0:
            # As root apt drops to _apt, which cannot write into our cache directory.
            self.options.append("-oAPT::Sandbox::User=root")

    def update(self) -> None:
        _run("apt-get update (private sources)", ["apt-get", *self.options, "-q", "update"])

    def pkgnames(self, prefix: str) -> list[str]:
        out = _run("apt-cache pkgnames", ["apt-cache", *self.options, "pkgnames", prefix])
        return out.split()

    def madison(self, packages: Sequence[str]) -> str:
        return _run("apt-cache madison", ["apt-cache", *self.options, "madison", *packages])

    def download(self, packages: Sequence[str], dest: Path) -> None:
        _run("apt-get download", ["apt-get", *self.options, "-q", "download", *packages], dest)


def _debs_dir(layout: Layout, abi: str, version: str) -> Path:
    return layout.cache / "debs" / f"{abi}_{version}"


def _load_cached(layout: Layout, abi: str, version: str) -> KernelDebs | None:
    """The cached debs for (abi, version) if their stamp matches the files on disk."""
    where = _debs_dir(layout, abi, version)
    try:
        stamp = json.loads((where / "stamp.json").read_text())
        files = stamp["files"]
        debs = tuple(where / name for name in files)
        if stamp["abi"] != abi or stamp["version"] != version or len(debs) != 3:
            return None
        if any(p.stat().st_size != files[p.name] for p in debs):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return KernelDebs(abi, version, debs)


def _read_current(layout: Layout) -> tuple[str, str] | None:
    try:
        data = json.loads((layout.cache / "kernel.json").read_text())
        return str(data["abi"]), str(data["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def cached_kernel(layout: Layout) -> KernelDebs | None:
    """The current kernel from the cache, without touching the network."""
    current = _read_current(layout)
    return _load_cached(layout, *current) if current else None


def fetch_kernel(
    layout: Layout, log: Log, *, refresh: bool = False, env: Mapping[str, str] = os.environ
) -> KernelDebs:
    """Return the kernel .debs, downloading them only if the cache cannot serve the request.

    Without ``refresh`` the cached choice is kept, so a newer kernel in the archive is only
    picked up by ``ensure --refresh``.  $WSD_VMTEST_KERNEL_ABI / _PKG_VERSION pin a kernel.
    """
    want_abi = env.get(ENV_ABI) or None
    want_version = env.get(ENV_VERSION) or None
    current = _read_current(layout)
    if not refresh and current is not None:
        abi, version = current
        if want_abi in (None, abi) and want_version in (None, version):
            cached = _load_cached(layout, abi, version)
            if cached is not None:
                log(f"{cached.label}: cached")
                return cached

    mirror = find_debian_mirror()
    log(f"kernel: apt-get update ({', '.join(KERNEL_SUITES)}) from {mirror}")
    apt = PrivateApt(layout.cache / "apt", mirror)
    apt.update()
    abi = want_abi or choose_kernel_abi(apt.pkgnames("linux-binary-"))
    packages = [t.format(abi=abi) for t in PACKAGE_TEMPLATES]
    available = parse_madison(apt.madison(packages))
    version = want_version or choose_version(abi, available)
    for name in packages:
        if version not in available.get(name, []):
            raise InfraError("choose kernel", f"{name} {version} is not in the archive")

    kernel = _load_cached(layout, abi, version)
    if kernel is not None:
        log(f"{kernel.label}: cached")
    else:
        kernel = _download(layout, apt, abi=abi, version=version, packages=packages, log=log)
    _write_json(layout.cache / "kernel.json", {"abi": abi, "version": version, "mirror": mirror})
    _prune_debs(layout, keep=kernel.debs[0].parent)
    return kernel


def _download(
    layout: Layout, apt: PrivateApt, *, abi: str, version: str, packages: list[str], log: Log
) -> KernelDebs:
    where = _debs_dir(layout, abi, version)
    where.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmpdir = Path(tempfile.mkdtemp(prefix=".download-", dir=where.parent))
    try:
        apt.download([f"{name}={version}" for name in packages], tmpdir)
        files: dict[str, int] = {}
        for name in packages:
            found = sorted(tmpdir.glob(f"{name}_*.deb"))
            if len(found) != 1:
                raise InfraError("apt-get download", f"expected one {name}_*.deb, got {found}")
            files[found[0].name] = found[0].stat().st_size
        _write_json(tmpdir / "stamp.json", {"abi": abi, "version": version, "files": files})
        if where.exists():
            shutil.rmtree(where)
        tmpdir.rename(where)
        where.chmod(0o755)  # mkdtemp made it 0700
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    kernel = _load_cached(layout, abi, version)
    if kernel is None:
        raise InfraError("apt-get download", f"downloaded files in {where} do not match")
    size = sum(p.stat().st_size for p in kernel.debs) / 1e6
    log(f"{kernel.label}: downloaded {size:.0f} MB in {time.monotonic() - started:.0f} s")
    return kernel


def _prune_debs(layout: Layout, keep: Path) -> None:
    """Drop .debs of kernels no longer current: each set is about 120 MB."""
    parent = layout.cache / "debs"
    for old in parent.iterdir() if parent.is_dir() else ():
        if old.is_dir() and old != keep and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)


# --- installing into /lib/modules ---------------------------------------------------------


def kernel_image(layout: Layout, abi: str) -> Path:
    return layout.modules_root / abi / "vmlinuz"


def installed_version(layout: Layout, abi: str) -> str | None:
    try:
        data = json.loads((layout.modules_root / abi / INSTALL_STAMP).read_text())
        return str(data["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _dpkg_owned_version(abi: str) -> str | None:
    """Version of an installed Debian linux-binary-<abi>, whose tree we must never touch."""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", f"linux-binary-{abi}"],
        capture_output=True,
        text=True,
        check=False,
    )
    status, _, version = proc.stdout.partition(" ")
    return version if proc.returncode == 0 and status == "installed" else None


def install_kernel(layout: Layout, kernel: KernelDebs, log: Log) -> Path:
    """Make ``/lib/modules/<abi>`` hold ``kernel`` (with depmod run); return its vmlinuz."""
    dest = layout.modules_root / kernel.abi
    image = kernel_image(layout, kernel.abi)
    if installed_version(layout, kernel.abi) == kernel.version and image.exists():
        log(f"install {dest}: up to date")
        return image
    if layout.modules_root == MODULES_ROOT:
        owned = _dpkg_owned_version(kernel.abi)
        if owned is not None and image.exists():
            log(f"install {dest}: owned by dpkg (linux-binary-{kernel.abi} {owned}); using it")
            return image
    if os.geteuid() != 0:
        raise InfraError(
            "install kernel",
            f"{dest} needs installing and that needs root: "
            f"run `sudo {layout.python} -m vmtest ensure` once",
        )
    layout.modules_root.mkdir(parents=True, exist_ok=True)
    # Unpack next to the destination so the final step is a rename on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".wsd-vmtest-", dir=layout.modules_root) as tmp:
        unpacked = Path(tmp) / "root"
        for deb in kernel.debs:
            _run("unpack kernel", ["dpkg-deb", "-x", str(deb), str(unpacked)])
        tree = next(
            (
                p
                for p in (
                    unpacked / "usr/lib/modules" / kernel.abi,
                    unpacked / "lib/modules" / kernel.abi,
                )
                if (p / "vmlinuz").exists()
            ),
            None,
        )
        if tree is None:
            raise InfraError("unpack kernel", f"no usr/lib/modules/{kernel.abi}/vmlinuz in debs")
        if dest.exists() or dest.is_symlink():
            dest.rename(Path(tmp) / "old")
        tree.rename(dest)
    _run("depmod", ["depmod", kernel.abi])
    _write_json(dest / INSTALL_STAMP, {"abi": kernel.abi, "version": kernel.version})
    log(f"install {dest}: installed {kernel.version}, depmod done")
    return image
