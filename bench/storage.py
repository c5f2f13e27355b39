"""Throughput and latency of the storage tiers, each beside a raw baseline of the same run.

    .venv/bin/python bench/storage.py [--pages N] [--batch N] [--dir DIR] [--json]

For 4 KiB pages (a third zero, a third text-like, a third random), every tier is
measured with and without encryption: ``put`` and ``get`` throughput in MB/s over
batches, and single-page ``get`` latency. The baselines, on the same data, run in the
same process: ``os.pwrite``/``os.pread`` of every page on the same filesystem, redis-py
SET/GET pipelines against the same redis-server, and zstd level 1 on every page. For
the file tier it also reports ``os.pread`` keeping each batch of pages until the batch
is read, as ``get_many`` must (the baseline drops each page at once, which lets the
allocator hand the same memory back for the next page). For the file tier with
AES-256-GCM it also reports the raw encrypted I/O: ``AESGCM.encrypt`` of every page
then ``os.pwrite``, and ``os.pread`` keeping each batch then ``AESGCM.decrypt``.

Each measurement is repeated ``--repeat`` times, alternating baseline and tier, and the
best run of each is kept: on a shared machine the best run is the one least disturbed
by other work. It starts and stops its own redis-server (appendonly yes, with
``--appendfsync``, everysec by default: with ``always`` the server fsyncs once per
batch of commands it reads, which penalises the baseline's many SETs against one MSET).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis.asyncio
import uvloop
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

REPO = Path(__file__).resolve().parent.parent
# The redis-server launcher is shared with the integration tests.
sys.path.insert(0, str(REPO / "tests" / "integration" / "storage"))

from redis_server import RedisServer  # noqa: E402

from wsd.storage import PageNamespace, PageStore, parse_storage_config  # noqa: E402
from wsd.storage.conformance import sample_page  # noqa: E402
from wsd.storage.registry import open_backend  # noqa: E402

PAGE = 4096
MB = 1e6


@dataclass
class Result:
    name: str
    put_mbps: float
    get_mbps: float
    get_p50_us: float
    get_p99_us: float
    base_put_mbps: float
    base_get_mbps: float
    base_p50_us: float
    base_p99_us: float
    stored_bytes: int | None = None
    base_stored_bytes: int | None = None
    base_kept_get_mbps: float | None = None
    base_aes_put_mbps: float | None = None
    base_aes_kept_get_mbps: float | None = None


def make_pages(count: int, seed: int = 1) -> dict[int, bytes]:
    """Zero, text-like and random pages, interleaved."""
    rng = random.Random(seed)
    flavours = (0, 2, 3)  # conformance.sample_page: zeros, text, random
    return {n * PAGE: sample_page(rng, PAGE, flavours[n % 3]) for n in range(count)}


def batches(pages: dict[int, bytes], size: int) -> list[dict[int, bytes]]:
    items = list(pages.items())
    return [dict(items[i : i + size]) for i in range(0, len(items), size)]


def best(runs: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    """Highest throughputs and lowest latencies over repeated runs."""
    put, get, p50, p99 = zip(*runs, strict=True)
    return max(put), max(get), min(p50), min(p99)


def percentiles(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49] * 1e6, cuts[98] * 1e6


async def measure_store(
    store: PageStore, ns: PageNamespace, pages: dict[int, bytes], batch: int, samples: list[int]
) -> tuple[float, float, float, float]:
    total = len(pages) * PAGE
    start = time.perf_counter()
    for chunk in batches(pages, batch):
        await store.put(ns, chunk, generation=1)
    await store.sync()
    put = total / (time.perf_counter() - start) / MB
    offsets = list(pages)
    start = time.perf_counter()
    for i in range(0, len(offsets), batch):
        await store.get_many(ns, offsets[i : i + batch])
    get = total / (time.perf_counter() - start) / MB
    latencies = []
    for offset in samples:
        t = time.perf_counter()
        await store.get(ns, offset)
        latencies.append(time.perf_counter() - t)
    return (put, get, *percentiles(latencies))


def measure_files(
    directory: Path, pages: dict[int, bytes], batch: int, samples: list[int]
) -> tuple[tuple[float, float, float, float], float]:
    """The file baseline, and its get throughput when each batch of pages is kept until
    the batch is read, as a ``get_many`` must (informational, not the baseline)."""
    path = directory / "baseline.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        total = len(pages) * PAGE
        start = time.perf_counter()
        for offset, data in pages.items():
            os.pwrite(fd, data, offset)
        os.fdatasync(fd)
        put = total / (time.perf_counter() - start) / MB
        start = time.perf_counter()
        for offset in pages:
            os.pread(fd, PAGE, offset)
        get = total / (time.perf_counter() - start) / MB
        offsets = list(pages)
        start = time.perf_counter()
        for i in range(0, len(offsets), batch):
            kept = [os.pread(fd, PAGE, offset) for offset in offsets[i : i + batch]]
        del kept
        kept_get = total / (time.perf_counter() - start) / MB
        latencies = []
        for offset in samples:
            t = time.perf_counter()
            os.pread(fd, PAGE, offset)
            latencies.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return (put, get, *percentiles(latencies)), kept_get


def measure_files_aes(directory: Path, pages: dict[int, bytes], batch: int) -> tuple[float, float]:
    """Raw encrypted file I/O (informational, not the baseline): put and kept-batch get
    MB/s of ``AESGCM.encrypt`` (random nonce, the offset as associated data) and
    ``os.pwrite`` of each page with its tag, then one ``os.fdatasync``; ``os.pread`` of
    each batch, then ``AESGCM.decrypt`` of its pages. Every page is encrypted whole,
    zero pages too, where the tier seals those as one byte."""
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    record = PAGE + 16
    path = directory / "baseline-aes.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        total = len(pages) * PAGE
        nonces = {offset: os.urandom(12) for offset in pages}
        start = time.perf_counter()
        for offset, data in pages.items():
            aad = offset.to_bytes(8, "little")
            os.pwrite(fd, aead.encrypt(nonces[offset], data, aad), offset // PAGE * record)
        os.fdatasync(fd)
        put = total / (time.perf_counter() - start) / MB
        offsets = list(pages)
        start = time.perf_counter()
        for i in range(0, len(offsets), batch):
            chunk = offsets[i : i + batch]
            sealed = [os.pread(fd, record, offset // PAGE * record) for offset in chunk]
            kept = [
                aead.decrypt(nonces[offset], data, offset.to_bytes(8, "little"))
                for offset, data in zip(chunk, sealed, strict=True)
            ]
        del kept
        get = total / (time.perf_counter() - start) / MB
    finally:
        os.close(fd)
        path.unlink()
    return put, get


async def measure_redis(
    url: str, pages: dict[int, bytes], batch: int, samples: list[int]
) -> tuple[float, float, float, float]:
    client = redis.asyncio.Redis.from_url(url)
    total = len(pages) * PAGE
    key = "baseline:{}".format
    start = time.perf_counter()
    for chunk in batches(pages, batch):
        async with client.pipeline(transaction=False) as pipe:
            for offset, data in chunk.items():
                pipe.set(key(offset), data)
            await pipe.execute()
    put = total / (time.perf_counter() - start) / MB
    offsets = list(pages)
    start = time.perf_counter()
    for i in range(0, len(offsets), batch):
        async with client.pipeline(transaction=False) as pipe:
            for offset in offsets[i : i + batch]:
                pipe.get(key(offset))
            await pipe.execute()
    get = total / (time.perf_counter() - start) / MB
    latencies = []
    for offset in samples:
        t = time.perf_counter()
        await client.get(key(offset))
        latencies.append(time.perf_counter() - t)
    await client.delete(*(key(o) for o in pages))
    await client.aclose()
    return (put, get, *percentiles(latencies))


def measure_zstd(
    pages: dict[int, bytes], samples: list[int]
) -> tuple[float, float, float, float, int]:
    compressor = zstandard.ZstdCompressor(level=1)
    decompressor = zstandard.ZstdDecompressor()
    total = len(pages) * PAGE
    start = time.perf_counter()
    frames = {offset: compressor.compress(data) for offset, data in pages.items()}
    put = total / (time.perf_counter() - start) / MB
    start = time.perf_counter()
    for frame in frames.values():
        decompressor.decompress(frame)
    get = total / (time.perf_counter() - start) / MB
    latencies = []
    for offset in samples:
        t = time.perf_counter()
        decompressor.decompress(frames[offset])
        latencies.append(time.perf_counter() - t)
    stored = sum(len(f) for f in frames.values())
    p50, p99 = percentiles(latencies)
    return put, get, p50, p99, stored


async def measure_baseline(
    kind: str, args: argparse.Namespace, url: str, pages: dict[int, bytes], samples: list[int]
) -> tuple[tuple[float, float, float, float], float | None]:
    """The raw baseline of a tier's kind, and one extra figure: for file the get
    throughput keeping each batch, for zstd the bytes it compressed to."""
    if kind == "file":
        return measure_files(Path(args.work), pages, args.batch, samples)
    if kind == "redis":
        return await measure_redis(url, pages, args.batch, samples), None
    put, get, p50, p99, stored = measure_zstd(pages, samples)
    return (put, get, p50, p99), stored


async def run(args: argparse.Namespace) -> list[Result]:
    pages = make_pages(args.pages)
    samples = random.Random(2).choices(list(pages), k=args.samples)
    work = Path(tempfile.mkdtemp(prefix="wsd-bench-", dir=args.dir))
    args.work = str(work)
    key_file = work / "aes.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o600)
    aes = {"key": {"file": str(key_file)}}
    results: list[Result] = []
    server = RedisServer(work / "redis", settings={"appendfsync": args.appendfsync})
    server.start()
    try:
        configs: list[tuple[str, dict[str, object]]] = [
            ("file", {"kind": "file", "root": str(work / "file")}),
            ("file+aes", {"kind": "file", "root": str(work / "file-aes"), "encryption": aes}),
            ("redis", {"kind": "redis", "url": server.unix_url}),
            ("redis+aes", {"kind": "redis", "url": server.unix_url, "encryption": aes}),
            ("zstd", {"kind": "zstd", "budget_bytes": 4 * len(pages) * PAGE}),
        ]
        for name, table_ in configs:
            kind = name.split("+")[0]
            runs: list[tuple[float, float, float, float]] = []
            base_runs: list[tuple[float, float, float, float]] = []
            extras: list[float] = []
            aes_runs: list[tuple[float, float]] = []
            stored = None
            for attempt in range(args.repeat):
                base, extra = await measure_baseline(kind, args, server.unix_url, pages, samples)
                base_runs.append(base)
                if extra is not None:
                    extras.append(extra)
                if name == "file+aes":
                    aes_runs.append(measure_files_aes(work, pages, args.batch))
                store = await open_backend(parse_storage_config(table_), environ={})
                ns = PageNamespace(f"bench-{kind}-{attempt}", 0)
                try:
                    runs.append(await measure_store(store, ns, pages, args.batch, samples))
                    stored = (await store.stats()).stored_bytes
                finally:
                    await store.discard(ns)
                    await store.close()
            result = Result(name, *best(runs), *best(base_runs))
            if kind == "zstd":
                result.stored_bytes, result.base_stored_bytes = stored, int(extras[-1])
            if kind == "file":
                result.base_kept_get_mbps = max(extras)
            if aes_runs:
                result.base_aes_put_mbps = max(put for put, _ in aes_runs)
                result.base_aes_kept_get_mbps = max(get for _, get in aes_runs)
            results.append(result)
            if not args.json:
                print(f"  measured {name}", file=sys.stderr)
    finally:
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return results


def table(results: list[Result], args: argparse.Namespace) -> str:
    head = (
        f"{'tier':<10} {'put MB/s':>9} {'base':>8} {'ratio':>6}  "
        f"{'get MB/s':>9} {'base':>8} {'ratio':>6}  "
        f"{'get p50/p99 µs':>15} {'base p50/p99 µs':>16}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.name:<10} {r.put_mbps:9.0f} {r.base_put_mbps:8.0f} "
            f"{r.put_mbps / r.base_put_mbps:6.2f}  "
            f"{r.get_mbps:9.0f} {r.base_get_mbps:8.0f} {r.get_mbps / r.base_get_mbps:6.2f}  "
            f"{r.get_p50_us:7.1f}/{r.get_p99_us:<7.1f} {r.base_p50_us:8.1f}/{r.base_p99_us:<7.1f}"
        )
    for r in results:
        if r.base_kept_get_mbps:
            lines.append(
                f"{r.name}: get {r.get_mbps:.0f} MB/s is {r.get_mbps / r.base_kept_get_mbps:.2f} "
                f"of os.pread keeping each batch of {args.batch} pages "
                f"({r.base_kept_get_mbps:.0f} MB/s), as a get_many must"
            )
    for r in results:
        if r.base_aes_put_mbps and r.base_aes_kept_get_mbps:
            lines.append(
                f"{r.name}: put is {r.put_mbps / r.base_aes_put_mbps:.2f} of AESGCM.encrypt and "
                f"os.pwrite per page ({r.base_aes_put_mbps:.0f} MB/s); get is "
                f"{r.get_mbps / r.base_aes_kept_get_mbps:.2f} of os.pread keeping each batch "
                f"then AESGCM.decrypt ({r.base_aes_kept_get_mbps:.0f} MB/s)"
            )
    for r in results:
        if r.stored_bytes and r.base_stored_bytes:
            logical = args.pages * PAGE
            lines.append(
                f"compression ratio: zstd tier {logical / r.stored_bytes:.2f}, "
                f"zstd level 1 per page {logical / r.base_stored_bytes:.2f}"
            )
    lines.append(
        f"{args.pages} pages of 4 KiB, batches of {args.batch}, {args.samples} latency samples, "
        f"best of {args.repeat}, redis appendfsync {args.appendfsync}; "
        "baselines: file=os.pwrite/os.pread, redis=redis-py SET/GET pipelines, "
        "zstd=ZstdCompressor(level=1) per page"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=8192, help="4 KiB pages per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, best kept")
    parser.add_argument("--appendfsync", choices=["always", "everysec", "no"], default="everysec")
    parser.add_argument("--batch", type=int, default=256, help="pages per put/get_many")
    parser.add_argument("--samples", type=int, default=2000, help="single-page gets timed")
    parser.add_argument("--dir", default=None, help="where files go (default: $TMPDIR)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    results = uvloop.run(run(args))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
