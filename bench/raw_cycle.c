/*
 * The raw kernel work of one wsd tracking cycle, with no policy around it:
 * the floor that bench/tracker_cycle.py compares wsd's cycle against.
 *
 *   raw_cycle MODE UFFD_FD PID START LEN
 *
 * MODE is "rwp" or "wp-async".  UFFD_FD is an inherited userfaultfd that is
 * already negotiated, registered and armed (wsd's tracker did that; this
 * program shares its uffd file).  PID owns the tracked range [START,
 * START+LEN).  One cycle per "c" line on stdin, one JSON line per cycle on
 * stdout; "q" or EOF ends.
 *
 *   rwp:      SET_MODE(disable RWP_ASYNC), PAGEMAP_SCAN(ACCESSED),
 *             RWPROTECT(whole range), SET_MODE(enable RWP_ASYNC)
 *   wp-async: PAGEMAP_SCAN(WRITTEN, WP_MATCHING | CHECK_WPASYNC)
 *
 * The output vector holds the worst case (every other page matching), so one
 * PAGEMAP_SCAN call always covers the range.
 *
 * The RWP uapi (Linux 7.3) is newer than the build host's headers, so the
 * structs and request numbers are declared here, numbers computed with
 * _IOW/_IOWR from <linux/ioctl.h> exactly as the uapi headers do.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/ioctl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

struct bench_uffd_range {
	uint64_t start;
	uint64_t len;
};

struct bench_uffd_rwprotect {
	struct bench_uffd_range range;
	uint64_t mode;
};

struct bench_uffd_set_mode {
	uint64_t enable;
	uint64_t disable;
};

struct bench_page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

struct bench_pm_scan_arg {
	uint64_t size;
	uint64_t flags;
	uint64_t start;
	uint64_t end;
	uint64_t walk_end;
	uint64_t vec;
	uint64_t vec_len;
	uint64_t max_pages;
	uint64_t category_inverted;
	uint64_t category_mask;
	uint64_t category_anyof_mask;
	uint64_t return_mask;
};

#define BENCH_UFFDIO 0xAA
#define BENCH_UFFDIO_RWPROTECT _IOWR(BENCH_UFFDIO, 0x09, struct bench_uffd_rwprotect)
#define BENCH_UFFDIO_SET_MODE _IOW(BENCH_UFFDIO, 0x0A, struct bench_uffd_set_mode)
#define BENCH_PAGEMAP_SCAN _IOWR('f', 16, struct bench_pm_scan_arg)

#define BENCH_RWPROTECT_MODE_RWP (1ULL << 0)
#define BENCH_FEATURE_RWP_ASYNC (1ULL << 18)
#define BENCH_PAGE_IS_WRITTEN (1ULL << 1)
#define BENCH_PAGE_IS_ACCESSED (1ULL << 9)
#define BENCH_PM_SCAN_WP_MATCHING (1ULL << 0)
#define BENCH_PM_SCAN_CHECK_WPASYNC (1ULL << 1)

enum step { SET_SYNC, SCAN, RWPROTECT, SET_ASYNC, NSTEPS };
static const char *const step_name[NSTEPS] = { "set_mode_sync", "scan", "rwprotect", "set_mode_async" };

static void die(const char *what)
{
	fprintf(stderr, "raw_cycle: %s: %s\n", what, strerror(errno));
	exit(2);
}

static uint64_t clock_ns(clockid_t id)
{
	struct timespec ts;
	clock_gettime(id, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: %s rwp|wp-async UFFD_FD PID START LEN\n", argv[0]);
		return 2;
	}
	int rwp = !strcmp(argv[1], "rwp");
	if (!rwp && strcmp(argv[1], "wp-async")) {
		fprintf(stderr, "raw_cycle: unknown mode %s\n", argv[1]);
		return 2;
	}
	int uffd = atoi(argv[2]);
	uint64_t start = strtoull(argv[4], NULL, 0), len = strtoull(argv[5], NULL, 0);
	char path[64];
	snprintf(path, sizeof(path), "/proc/%s/pagemap", argv[3]);
	int pm = open(path, O_RDONLY | O_CLOEXEC);
	if (pm < 0)
		die(path);

	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
	uint64_t vec_len = len / page / 2 + 1;
	struct bench_page_region *vec = calloc(vec_len, sizeof(*vec));
	if (!vec)
		die("calloc");
	memset(vec, 0xff, vec_len * sizeof(*vec)); /* fault the vector in now, not in cycle 1 */

	struct bench_uffd_set_mode sync_mode = { .disable = BENCH_FEATURE_RWP_ASYNC };
	struct bench_uffd_set_mode async_mode = { .enable = BENCH_FEATURE_RWP_ASYNC };
	struct bench_uffd_rwprotect arm = { .range = { start, len }, .mode = BENCH_RWPROTECT_MODE_RWP };
	uint64_t cat = rwp ? BENCH_PAGE_IS_ACCESSED : BENCH_PAGE_IS_WRITTEN;

	setvbuf(stdout, NULL, _IOLBF, 0);
	char line[16];
	while (fgets(line, sizeof(line), stdin) && line[0] == 'c') {
		uint64_t cpu[NSTEPS] = { 0 }, wall[NSTEPS] = { 0 };
		uint64_t c0 = clock_ns(CLOCK_PROCESS_CPUTIME_ID), w0 = clock_ns(CLOCK_MONOTONIC);
		uint64_t c = c0, w = w0;
#define STEP(s)                                                  \
	do {                                                     \
		uint64_t c2 = clock_ns(CLOCK_PROCESS_CPUTIME_ID); \
		uint64_t w2 = clock_ns(CLOCK_MONOTONIC);          \
		cpu[s] = c2 - c;                                 \
		wall[s] = w2 - w;                                \
		c = c2;                                          \
		w = w2;                                          \
	} while (0)

		if (rwp) {
			if (ioctl(uffd, BENCH_UFFDIO_SET_MODE, &sync_mode))
				die("UFFDIO_SET_MODE(sync)");
			STEP(SET_SYNC);
		}
		struct bench_pm_scan_arg arg = {
			.size = sizeof(arg),
			.flags = rwp ? 0 : BENCH_PM_SCAN_WP_MATCHING | BENCH_PM_SCAN_CHECK_WPASYNC,
			.start = start,
			.end = start + len,
			.vec = (uintptr_t)vec,
			.vec_len = vec_len,
			.category_mask = cat,
			.return_mask = cat,
		};
		long n = ioctl(pm, BENCH_PAGEMAP_SCAN, &arg);
		if (n < 0)
			die("PAGEMAP_SCAN");
		STEP(SCAN);
		if (rwp) {
			if (ioctl(uffd, BENCH_UFFDIO_RWPROTECT, &arm))
				die("UFFDIO_RWPROTECT");
			STEP(RWPROTECT);
			if (ioctl(uffd, BENCH_UFFDIO_SET_MODE, &async_mode))
				die("UFFDIO_SET_MODE(async)");
			STEP(SET_ASYNC);
		}
		uint64_t cpu_total = c - c0, wall_total = w - w0;

		/* Outside the timed part: count what the scan found, for the cross-check. */
		uint64_t hot = 0;
		for (long i = 0; i < n; i++)
			hot += (vec[i].end - vec[i].start) / page;
		printf("{\"cpu_ns\": %" PRIu64 ", \"wall_ns\": %" PRIu64 ", \"hot_pages\": %" PRIu64
		       ", \"regions\": %ld, \"walk_end\": %" PRIu64 ", \"steps_cpu_ns\": {",
		       cpu_total, wall_total, hot, n, (uint64_t)arg.walk_end);
		const char *sep = "";
		for (int s = 0; s < NSTEPS; s++)
			if (rwp || s == SCAN) {
				printf("%s\"%s\": %" PRIu64, sep, step_name[s], cpu[s]);
				sep = ", ";
			}
		printf("}, \"steps_wall_ns\": {");
		sep = "";
		for (int s = 0; s < NSTEPS; s++)
			if (rwp || s == SCAN) {
				printf("%s\"%s\": %" PRIu64, sep, step_name[s], wall[s]);
				sep = ", ";
			}
		printf("}}\n");
	}
	return 0;
}
