"""Unit tests for the VM harness (vmtest/): parsing, decisions, command lines, process handling.

No network and no VM: apt output and /etc/apt, /dev, /sys, /proc are samples under tmp_path,
and the process tests run small shell commands in place of vng.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path

import pytest

from vmtest import InfraError
from vmtest.__main__ import junit_path, parse_args, split_vm_options
from vmtest.apt import (
    DEBIAN_KEYRING,
    choose_kernel_abi,
    choose_version,
    compare_versions,
    find_debian_mirror,
    parse_deb822_sources,
    parse_kernel_abi,
    parse_madison,
    parse_one_line_sources,
    private_sources_list,
)
from vmtest.kernel import ENV_CACHE, Layout
from vmtest.qemu import (
    STARTED_FILE,
    STATUS_FILE,
    KvmVerdict,
    VmConfig,
    VmResult,
    detect_kvm,
    guest_script,
    load_learnt,
    run_vm,
    save_learnt,
    vng_command,
    vng_environment,
)
from vmtest.session import kvm_failure_reason

# --- mirror discovery ---------------------------------------------------------------------

DEB822_HOST = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

DEB822_SECURITY_FIRST = """\
Types: deb
URIs: https://security.example/debian
Suites: trixie-security
Components: main

Types: deb-src deb
URIs: https://mirror.example/debian/
Suites: trixie
Components: main contrib
"""

DEB822_OTHER_VENDOR = """\
Types: deb
URIs: https://deb.nodesource.example/node_20.x
Suites: nodistro
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBF...
 -----END PGP PUBLIC KEY BLOCK-----
"""

ONE_LINE = """\
# deb http://commented.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] https://packages.example/apt cloud main
deb http://security.example/debian-security bookworm-security main
deb-src http://src.example/debian bookworm main
deb [ trusted=yes ] http://one.example/debian/ bookworm main contrib # trailing comment
"""


def test_deb822_picks_main_archive_not_security() -> None:
    entries = parse_deb822_sources(DEB822_HOST)
    assert [e.uris for e in entries] == [
        ("http://mirror.example/debian",),
        ("http://mirror.example/debian-security",),
    ]
    assert entries[0].suites == ("bookworm", "bookworm-updates")


def test_deb822_security_path_debian_is_skipped_by_suite(tmp_path: Path) -> None:
    # A security archive whose path also ends in /debian is told apart by its suite.
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(DEB822_SECURITY_FIRST)
    assert find_debian_mirror(tmp_path) == "https://mirror.example/debian"


def test_deb822_continuation_lines_and_disabled_entries() -> None:
    (entry,) = parse_deb822_sources(DEB822_OTHER_VENDOR)
    assert entry.uris == ("https://deb.nodesource.example/node_20.x",)
    (disabled,) = parse_deb822_sources(
        "Types: deb\nURIs: http://a.example/debian\nSuites: sid\nEnabled: no\n"
    )
    assert not disabled.enabled


def test_one_line_format() -> None:
    entries = parse_one_line_sources(ONE_LINE)
    assert [(e.types, e.uris, e.suites) for e in entries] == [
        (("deb",), ("https://packages.example/apt",), ("cloud",)),
        (("deb",), ("http://security.example/debian-security",), ("bookworm-security",)),
        (("deb-src",), ("http://src.example/debian",), ("bookworm",)),
        (("deb",), ("http://one.example/debian/",), ("bookworm",)),
    ]
    assert entries[-1].components == ("main", "contrib")


def test_find_mirror_reads_what_apt_reads(tmp_path: Path) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    # apt ignores files with other suffixes, and so must we.
    (parts / "old.list.disabled-by-farm").write_text("deb http://old.example/debian sid main\n")
    (parts / "nodesource.sources").write_text(DEB822_OTHER_VENDOR)
    (parts / "vendor.list").write_text(ONE_LINE)
    assert find_debian_mirror(tmp_path) == "http://one.example/debian"
    (tmp_path / "sources.list").write_text("deb http://first.example/debian bookworm main\n")
    assert find_debian_mirror(tmp_path) == "http://first.example/debian"


def test_find_mirror_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://security.example/debian-security x main\n")
    with pytest.raises(InfraError, match="no main Debian archive"):
        find_debian_mirror(tmp_path)


def test_private_sources_list() -> None:
    text = private_sources_list("http://mirror.example/debian")
    assert text.splitlines() == [
        f"deb [arch=amd64 signed-by={DEBIAN_KEYRING}] http://mirror.example/debian sid main",
        f"deb [arch=amd64 signed-by={DEBIAN_KEYRING}] http://mirror.example/debian "
        "experimental main",
    ]


# --- choosing the kernel ------------------------------------------------------------------

# `apt-cache pkgnames linux-binary-` against sid + experimental, 7.3~rc7 era.
PKGNAMES = """\
linux-binary-7.2.13+deb14-amd64
linux-binary-7.2.13+deb14-cloud-amd64
linux-binary-7.2.13+deb14-rt-amd64
linux-binary-7.3-amd64
linux-binary-7.3-cloud-amd64
linux-binary-7.3-rt-amd64
"""

MADISON = """\
linux-binary-7.3-amd64 | 7.3~rc7-1~exp1 | http://m.example/debian experimental/main amd64 Packages
linux-binary-7.3-amd64 | 7.3~rc6-1~exp1 | http://m.example/debian experimental/main amd64 Packages
linux-modules-7.3-amd64 | 7.3~rc7-1~exp1 | http://m.example/debian experimental/main amd64 Packages
linux-modules-7.3-amd64 | 7.3~rc6-1~exp1 | http://m.example/debian experimental/main amd64 Packages
linux-base-7.3-amd64 | 7.3~rc6-1~exp1 | http://m.example/debian experimental/main amd64 Packages
linux-base-7.3-amd64 | 7.3~rc7-1~exp1 | http://m.example/debian experimental/main amd64 Packages
"""


def test_choose_abi_today() -> None:
    assert choose_kernel_abi(PKGNAMES.split()) == "7.3-amd64"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["linux-binary-7.4-amd64"], "7.4-amd64"),
        (["linux-binary-7.3.2+deb14-amd64"], "7.3.2+deb14-amd64"),
        (["linux-binary-7.10-amd64", "linux-binary-7.9.1+deb14-amd64"], "7.10-amd64"),
        (["linux-binary-7.4-cloud-amd64", "linux-binary-7.4-rt-amd64"], "7.3-amd64"),
        (["linux-binary-8.0-amd64", "linux-binary-7.4-amd64-dbg"], "7.3-amd64"),
    ],
)
def test_choose_abi_prefers_newest_generic_7x(extra: list[str], expected: str) -> None:
    assert choose_kernel_abi([*PKGNAMES.split(), *extra]) == expected


def test_choose_abi_none_new_enough() -> None:
    with pytest.raises(InfraError, match=r"linux-binary-7\.N-amd64"):
        choose_kernel_abi(["linux-binary-7.2.13+deb14-amd64", "linux-binary-7.3-cloud-amd64"])


def test_parse_kernel_abi() -> None:
    series = parse_kernel_abi("linux-binary-7.2.13+deb14-amd64")
    assert series is not None
    assert (series.key, series.abi) == ((7, 2, 13), "7.2.13+deb14-amd64")
    assert parse_kernel_abi("linux-binary-7.3-rt-amd64") is None
    assert parse_kernel_abi("linux-image-7.3-amd64") is None


def test_choose_version_common_to_all_packages() -> None:
    madison = parse_madison(MADISON)
    assert madison["linux-base-7.3-amd64"] == ["7.3~rc6-1~exp1", "7.3~rc7-1~exp1"]
    assert choose_version("7.3-amd64", madison) == "7.3~rc7-1~exp1"
    del madison["linux-base-7.3-amd64"][1]
    assert choose_version("7.3-amd64", madison) == "7.3~rc6-1~exp1"
    with pytest.raises(InfraError, match=r"no version of 7\.4-amd64"):
        choose_version("7.4-amd64", madison)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("7.3~rc7-1~exp1", "7.3-1", -1),
        ("7.3~rc7-1~exp1", "7.3~rc6-1~exp1", 1),
        ("7.3~rc7-1~exp1", "7.3~rc7-1", -1),
        ("7.2.13-1", "7.3~rc7-1~exp1", -1),
        ("7.10-1", "7.9-1", 1),
        ("1.0", "1.0-0", 0),
        ("1.0a", "1.0", 1),
        ("1.0+b1", "1.0a", 1),
        ("1.0~", "1.0", -1),
        ("2:1.0", "1:9.9", 1),
        ("1:1.0", "1.0", 1),
        ("1.0-1.1", "1.0-1", 1),
        ("1.0-1", "1.0-1", 0),
    ],
)
def test_compare_versions(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


# --- KVM or TCG ---------------------------------------------------------------------------


def fake_root(tmp_path: Path, *, kvm: bool = True, pvm: bool = False, flag: str = "vmx") -> Path:
    (tmp_path / "dev").mkdir()
    (tmp_path / "proc").mkdir()
    (tmp_path / "sys/module/kvm").mkdir(parents=True)
    if kvm:
        (tmp_path / "dev/kvm").touch()
    if pvm:
        (tmp_path / "sys/module/kvm_pvm").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(
        f"processor\t: 0\nflags\t\t: fpu sse2 {flag} avx2\n\nprocessor\t: 1\n"
    )
    return tmp_path


def test_kvm_usable(tmp_path: Path) -> None:
    verdict = detect_kvm(fake_root(tmp_path), env={})
    assert verdict.use_kvm
    assert not verdict.confirmed


def test_kvm_svm_counts(tmp_path: Path) -> None:
    assert detect_kvm(fake_root(tmp_path, flag="svm"), env={}).use_kvm


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"kvm": False}, "no /dev/kvm"),
        ({"pvm": True}, "PVM"),
        ({"flag": "hypervisor"}, "neither vmx nor svm"),
    ],
)
def test_kvm_unusable(tmp_path: Path, kwargs: dict[str, bool | str], reason: str) -> None:
    root = fake_root(tmp_path, **kwargs)  # type: ignore[arg-type]
    verdict = detect_kvm(root, env={})
    assert not verdict.use_kvm
    assert reason in verdict.reason


def test_kvm_not_accessible(tmp_path: Path) -> None:
    verdict = detect_kvm(fake_root(tmp_path), env={}, access=lambda _path, _mode: False)
    assert not verdict.use_kvm
    assert "not read-writable" in verdict.reason


def test_kvm_env_forces_either_way(tmp_path: Path) -> None:
    pvm = fake_root(tmp_path, pvm=True)
    forced = detect_kvm(pvm, env={"WSD_VMTEST_KVM": "1"})
    assert forced.use_kvm
    assert forced.forced
    usable = tmp_path / "usable"
    usable.mkdir()
    assert not detect_kvm(fake_root(usable), env={"WSD_VMTEST_KVM": "0"}).use_kvm


def test_kvm_learnt_failure_wins_over_probe(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    failed = KvmVerdict(False, "a KVM boot failed with 'KVM internal error'", confirmed=True)
    assert detect_kvm(root, env={}, learnt=failed) == failed
    worked = KvmVerdict(True, "a KVM boot worked", confirmed=True)
    assert detect_kvm(root, env={}, learnt=worked).confirmed
    # A learnt success does not override a host that has since lost KVM.
    (root / "dev/kvm").unlink()
    assert not detect_kvm(root, env={}, learnt=worked).use_kvm


def test_learnt_verdict_is_per_host_kernel(tmp_path: Path) -> None:
    path = tmp_path / "cache/kvm.json"
    save_learnt(path, "6.18.0", KvmVerdict(False, "KVM internal error"))
    learnt = load_learnt(path, "6.18.0")
    assert learnt == KvmVerdict(False, "KVM internal error", confirmed=True)
    assert load_learnt(path, "6.19.0") is None
    assert load_learnt(tmp_path / "missing.json", "6.18.0") is None


# --- command lines ------------------------------------------------------------------------

KERNEL = Path("/lib/modules/7.3-amd64/vmlinuz")
REPO = Path("/work/main")


def test_vng_command_tcg_with_exec() -> None:
    cfg = VmConfig(KERNEL, REPO, use_kvm=False, extra_rwdirs=(Path("/c/runs/run-1"),))
    assert vng_command(Path("/v/bin/vng"), cfg, "uname -r") == [
        "/v/bin/vng",
        "--run=/lib/modules/7.3-amd64/vmlinuz",
        "--memory=3G",
        "--cpus=2",
        "--cwd=/work/main",
        "--rwdir=/work/main",
        "--force-9p",
        "--rwdir=/c/runs/run-1",
        "--disable-kvm",
        "--qemu-opts=-cpu max,-avx,-avx2",
        "--exec",
        "uname -r",
    ]


def test_vng_command_kvm_shell() -> None:
    cfg = VmConfig(KERNEL, REPO, use_kvm=True, memory="1G", cpus=4)
    cmd = vng_command(Path("vng"), cfg)
    assert "--disable-kvm" not in cmd and not any(a.startswith("--qemu-opts") for a in cmd)
    assert "--exec" not in cmd
    assert cmd[2:4] == ["--memory=1G", "--cpus=4"]


def test_vng_command_refuses_paths_vng_would_mangle() -> None:
    # vng pastes these into a shell command line unquoted.
    cfg = VmConfig(KERNEL, Path("/home/me/my project"), use_kvm=False)
    with pytest.raises(InfraError, match="not shell-safe"):
        vng_command(Path("vng"), cfg)


def test_vng_environment_puts_venv_first() -> None:
    env = vng_environment(Path("/r/.venv/bin"), {"PATH": "/usr/bin", "HOME": "/root"})
    assert env == {"PATH": "/r/.venv/bin:/usr/bin", "HOME": "/root"}


def run_guest_script(tmp_path: Path, argv: list[str]) -> tuple[int, str, str]:
    """Run the guest one-liner with the host's sh, standing in for the guest's."""
    script = guest_script(
        argv, venv_bin=tmp_path / "bin", env={"WSD_KERNEL_TESTS_STRICT": "1"}, run_dir=tmp_path
    )
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)
    assert (tmp_path / STARTED_FILE).exists()
    return proc.returncode, (tmp_path / STATUS_FILE).read_text().strip(), proc.stdout


def test_guest_script_records_and_returns_status(tmp_path: Path) -> None:
    assert run_guest_script(tmp_path, ["sh", "-c", "exit 7"])[:2] == (7, "7")


def test_guest_script_quotes_arguments_and_sets_env(tmp_path: Path) -> None:
    argv = ["sh", "-c", 'echo "$WSD_KERNEL_TESTS_STRICT $0 ${PATH%%:*}"', "it's $HOME"]
    rc, status, out = run_guest_script(tmp_path, argv)
    assert (rc, status) == (0, "0")
    assert out == f"1 it's $HOME {tmp_path / 'bin'}\n"


def test_guest_script_command_not_found(tmp_path: Path) -> None:
    assert run_guest_script(tmp_path, ["/nonexistent/python"])[:2] == (127, "127")


# --- argument handling --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "vm", "rest"),
    [
        (["--memory", "2G", "--", "uname", "-r"], ["--memory", "2G"], ["uname", "-r"]),
        (["uname", "-r", "--memory", "2G"], [], ["uname", "-r", "--memory", "2G"]),
        (["--junitxml=r/k.xml", "-k", "foo"], [], ["--junitxml=r/k.xml", "-k", "foo"]),
        (["--timeout=60", "--", "--timeout=3"], ["--timeout=60"], ["--timeout=3"]),
        (["--cpus", "1", "--rwdir", "/x", "-x"], ["--cpus", "1", "--rwdir", "/x"], ["-x"]),
    ],
)
def test_split_vm_options(tokens: list[str], vm: list[str], rest: list[str]) -> None:
    assert split_vm_options(tokens) == (vm, rest)


def test_parse_run_and_pytest() -> None:
    ns = parse_args(["run", "--memory", "2G", "--timeout", "30", "--", "sh", "-c", "exit 7"])
    assert (ns.memory, ns.cpus, ns.timeout, ns.command) == ("2G", 2, 30.0, ["sh", "-c", "exit 7"])
    ns = parse_args(["pytest", "--junitxml=reports/kernel.xml", "-k", "rwp"])
    assert ns.command == ["--junitxml=reports/kernel.xml", "-k", "rwp"]
    assert ns.timeout == 1200.0


def test_junit_path() -> None:
    assert junit_path(["-q", "--junitxml=reports/k.xml"], REPO) == REPO / "reports/k.xml"
    assert junit_path(["--junit-xml", "/tmp/k.xml"], REPO) == Path("/tmp/k.xml")
    assert junit_path(["-k", "junitxml"], REPO) is None


def test_layout_cache_location(tmp_path: Path) -> None:
    assert Layout.from_env({"XDG_CACHE_HOME": str(tmp_path)}).cache == tmp_path / "wsd/vmtest"
    env = {"XDG_CACHE_HOME": "/elsewhere", ENV_CACHE: str(tmp_path / "c")}
    assert Layout.from_env(env).cache == tmp_path / "c"


# --- running (a shell stands in for vng) --------------------------------------------------


def run_fake_vm(script: str, timeout: float = 10, watch_kvm: bool = False) -> tuple[VmResult, str]:
    out, err = io.BytesIO(), io.BytesIO()
    result = run_vm(
        ["sh", "-c", script],
        timeout=timeout,
        env=os.environ,
        stdout=out,
        stderr=err,
        watch_kvm=watch_kvm,
    )
    return result, out.getvalue().decode() + err.getvalue().decode()


def test_run_vm_streams_and_returns_status() -> None:
    result, output = run_fake_vm("echo out; echo err >&2; exit 3")
    assert result.returncode == 3
    assert output == "out\nerr\n"


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_run_vm_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    # The background sleep stands in for qemu, a grandchild of the process we start.
    result, _ = run_fake_vm(f"sleep 60 & echo $! > {pidfile}; wait", timeout=1)
    assert result.timed_out
    assert result.returncode is None
    assert time.monotonic() - started < 8
    # A SIGKILLed process is gone once the kernel has run its exit, a moment
    # after the kill on a busy machine (CI, 2026-11-26).
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)


def test_run_vm_stops_on_kvm_internal_error() -> None:
    script = "echo 'KVM internal error. Suberror: 1'; echo 'emulation failure'; sleep 60"
    started = time.monotonic()
    result, _ = run_fake_vm(script, timeout=30, watch_kvm=True)
    assert result.kvm_internal_error
    assert time.monotonic() - started < 8


def testkvm_failure_reason_reason_prefers_qemu_lines() -> None:
    internal = "boot\nKVM internal error. Suberror: 1\nemulation failure\nRAX=0\n"
    assert kvm_failure_reason(internal) == "KVM internal error. Suberror: 1"
    msr = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\nqemu-system-x86_64: abort\n"
    assert kvm_failure_reason(msr) == "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69"
    assert kvm_failure_reason("") == "no output"


class ClosedPipe(io.BytesIO):
    def write(self, _data: object) -> int:
        raise BrokenPipeError


def test_run_vm_survives_a_closed_stdout() -> None:
    # `python -m vmtest run -- cmd | head -1`: the guest's status still comes back.
    result = run_vm(
        ["sh", "-c", "echo a; echo b; exit 4"],
        timeout=10,
        env=os.environ,
        stdout=ClosedPipe(),
        stderr=io.BytesIO(),
    )
    assert result.returncode == 4
