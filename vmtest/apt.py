"""Debian archive plumbing for the test kernel.  Everything here is pure parsing.

The kernel comes from Debian's ``sid``/``experimental`` suites, through the same mirror the
host already uses: the mirror is read from the host's apt sources rather than written down
anywhere, so the harness works behind whatever mirror or proxy a machine is set up with.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from vmtest import InfraError

#: Keyring that signs the main Debian archive (shipped by debian-archive-keyring).
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

#: Suites the kernel may come from: new kernels land in experimental, then sid.
KERNEL_SUITES = ("sid", "experimental")

#: Oldest kernel series with userfaultfd RWP; only 7.x series are considered.
MIN_SERIES = (7, 3)

#: The three packages that make up one kernel: image, modules, System.map/config.
PACKAGE_TEMPLATES = ("linux-binary-{abi}", "linux-modules-{abi}", "linux-base-{abi}")

# linux-binary-<ABI>, where ABI is "7.3-amd64" or "7.2.13+deb14-amd64".  The version part
# cannot contain "-", so "-cloud-amd64" (no 9p) and "-rt-amd64" flavours never match.
_BINARY_RE = re.compile(
    r"^linux-binary-(?P<abi>(?P<major>\d+)\.(?P<minor>\d+)(?:\.(?P<patch>\d+))?"
    r"(?:\+[a-z0-9.]+)?-amd64)$"
)


@dataclass(frozen=True)
class SourceEntry:
    """One apt source, from either the one-line or the deb822 format."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    enabled: bool = True


# --- host sources -------------------------------------------------------------------------


def parse_one_line_sources(text: str) -> list[SourceEntry]:
    """Parse ``sources.list`` lines: ``deb [opt=val ...] URI SUITE [COMPONENT...]``."""
    entries = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) < 3 or words[0] not in ("deb", "deb-src"):
            continue
        kind, rest = words[0], words[1:]
        if rest[0].startswith("["):
            # Options may be written "[a=b c=d]" or "[ a=b ]": skip through the closing "]".
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) < 2:
            continue
        entries.append(SourceEntry((kind,), (rest[0],), (rest[1],), tuple(rest[2:])))
    return entries


def _deb822_paragraphs(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    last = ""
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                yield fields
            fields, last = {}, ""
        elif raw[0] in " \t":
            if last:  # continuation line (e.g. an inline Signed-By key)
                fields[last] += "\n" + raw.strip()
        elif ":" in raw:
            name, value = raw.split(":", 1)
            last = name.strip().lower()
            fields[last] = value.strip()


def parse_deb822_sources(text: str) -> list[SourceEntry]:
    """Parse a deb822 ``*.sources`` file (``Types:``, ``URIs:``, ``Suites:``, ...)."""
    entries = []
    for fields in _deb822_paragraphs(text):
        entries.append(
            SourceEntry(
                types=tuple(fields.get("types", "").split()),
                uris=tuple(fields.get("uris", "").split()),
                suites=tuple(fields.get("suites", "").split()),
                components=tuple(fields.get("components", "").split()),
                enabled=fields.get("enabled", "yes").strip().lower() not in ("no", "false", "0"),
            )
        )
    return entries


def _is_main_archive(entry: SourceEntry, uri: str) -> bool:
    """True for the main Debian archive: a ``.../debian`` URI that is not the security one."""
    if not entry.enabled or "deb" not in entry.types:
        return False
    if any(s.endswith("-security") or "/" in s for s in entry.suites):
        return False
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return False
    return parts.path.rstrip("/").rsplit("/", 1)[-1] == "debian"


def mirror_from_entries(entries: Iterable[SourceEntry]) -> str | None:
    """Return the first main-archive URI (without trailing slash), or None."""
    for entry in entries:
        for uri in entry.uris:
            if _is_main_archive(entry, uri):
                return uri.rstrip("/")
    return None


def host_source_entries(etc_apt: Path = Path("/etc/apt")) -> list[SourceEntry]:
    """Read the sources apt itself would read: sources.list plus sources.list.d/*.{list,sources}.

    Files apt ignores (``*.disabled``, ``*.save``, ...) are ignored here too.
    """
    entries: list[SourceEntry] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        entries += parse_one_line_sources(main.read_text(errors="replace"))
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                entries += parse_one_line_sources(path.read_text(errors="replace"))
            elif path.suffix == ".sources":
                entries += parse_deb822_sources(path.read_text(errors="replace"))
    return entries


def find_debian_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The host's main Debian archive URI, e.g. ``http://mirror.example/debian``."""
    uri = mirror_from_entries(host_source_entries(etc_apt))
    if uri is None:
        raise InfraError(
            "find Debian mirror",
            f"no main Debian archive (an http(s) URI ending in /debian, not -security) in "
            f"{etc_apt}/sources.list or {etc_apt}/sources.list.d/",
        )
    return uri


def private_sources_list(mirror: str) -> str:
    """The sources.list for the private apt state: sid and experimental, main only."""
    return "".join(
        f"deb [arch=amd64 signed-by={DEBIAN_KEYRING}] {mirror} {suite} main\n"
        for suite in KERNEL_SUITES
    )


# --- choosing the kernel ------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class KernelSeries:
    """A kernel ABI name such as ``7.3-amd64``, ordered by (major, minor, patch)."""

    key: tuple[int, int, int]
    abi: str


def parse_kernel_abi(package: str) -> KernelSeries | None:
    """``linux-binary-7.3-amd64`` -> KernelSeries((7, 3, 0), "7.3-amd64"); other names -> None."""
    m = _BINARY_RE.match(package.strip())
    if m is None:
        return None
    key = (int(m["major"]), int(m["minor"]), int(m["patch"] or 0))
    return KernelSeries(key, m["abi"])


def choose_kernel_abi(package_names: Iterable[str], minimum: tuple[int, int] = MIN_SERIES) -> str:
    """Pick the newest generic-flavour 7.x ABI at or above ``minimum`` from package names.

    ``package_names`` is e.g. the output of ``apt-cache pkgnames linux-binary-7.``.
    """
    candidates = [
        s
        for s in map(parse_kernel_abi, package_names)
        if s is not None and s.key[0] == minimum[0] and s.key[:2] >= minimum
    ]
    if not candidates:
        raise InfraError(
            "choose kernel",
            f"no linux-binary-{minimum[0]}.N-amd64 package with N >= {minimum[1]} "
            f"in {' or '.join(KERNEL_SUITES)}",
        )
    return max(candidates).abi


def parse_madison(text: str) -> dict[str, list[str]]:
    """``apt-cache madison`` output -> {package: [versions...]} (duplicates removed)."""
    versions: dict[str, list[str]] = {}
    for line in text.splitlines():
        cols = [c.strip() for c in line.split("|")]
        if len(cols) < 3 or not cols[0] or not cols[1]:
            continue
        seen = versions.setdefault(cols[0], [])
        if cols[1] not in seen:
            seen.append(cols[1])
    return versions


def choose_version(abi: str, madison: dict[str, list[str]]) -> str:
    """The newest version available for all three packages of ``abi``."""
    names = [t.format(abi=abi) for t in PACKAGE_TEMPLATES]
    common = set(madison.get(names[0], []))
    for name in names[1:]:
        common &= set(madison.get(name, []))
    if not common:
        raise InfraError(
            "choose kernel", f"no version of {abi} is available for all of {', '.join(names)}"
        )
    return max(common, key=functools.cmp_to_key(compare_versions))


# --- Debian version ordering (Debian Policy 5.6.12) ---------------------------------------


def _char_order(c: str) -> int:
    # "~" sorts before everything, even the end of the string; letters before other symbols.
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_fragment(a: str, b: str) -> int:
    """Compare an upstream version or revision, alternating non-digit and digit runs."""
    i = j = 0
    while i < len(a) or j < len(b):
        # Non-digit run, character by character; the end of a string sorts as 0.
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ca = _char_order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            cb = _char_order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ca != cb:
                return -1 if ca < cb else 1
            i += i < len(a) and not a[i].isdigit()
            j += j < len(b) and not b[j].isdigit()
        # Digit run, numerically.
        si, sj = i, j
        while i < len(a) and a[i].isdigit():
            i += 1
        while j < len(b) and b[j].isdigit():
            j += 1
        na, nb = int(a[si:i] or 0), int(b[sj:j] or 0)
        if na != nb:
            return -1 if na < nb else 1
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, _, rest = v.partition(":") if ":" in v else ("0", "", v)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
    return int(epoch or 0), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """Compare two Debian package versions like ``dpkg --compare-versions``: -1, 0 or 1."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_fragment(ua, ub) or _compare_fragment(ra, rb)
