/*
 * The C side of bench/fault_latency.py and bench/evict_throughput.py: a guest
 * that touches pages and times each fault, the minimal fault handler it is
 * compared against, and the bare eviction loop.
 *
 *   fault_c guest SOCK_FD SIZE
 *       memfd_create + ftruncate(SIZE) + mmap(MAP_SHARED), and a raw
 *       userfaultfd (no UFFDIO_API: whoever receives it negotiates and
 *       registers, as wsd does with a VMM's uffd).  Sends the memfd and the
 *       uffd over the unix socket SOCK_FD (SCM_RIGHTS) with the mapping's
 *       address as payload, then reads commands on stdin:
 *         "t FIRST COUNT STRIDE": read one byte of each page FIRST + k*STRIDE,
 *             k < COUNT, one at a time; each read is timed with
 *             clock_gettime(CLOCK_MONOTONIC) before and after, so a page that
 *             is a hole measures the whole MISSING round trip (fault, handler,
 *             UFFDIO_COPY, wake, resume).  Prints one line: the COUNT
 *             start times (CLOCK_MONOTONIC, ns), then the COUNT latencies
 *             (ns), space separated.
 *         "q" or EOF: exit.
 *
 *   fault_c handler UFFD_FD
 *       The minimal handler: poll the (negotiated, registered) uffd and stdin;
 *       read fault messages, UFFDIO_COPY one prepared 4 KiB page to each
 *       faulting address (which wakes the toucher).  Exits on stdin EOF.
 *
 *   fault_c evict MEMFD UFFD_FD BASE NPAGES BATCH OUT_PATH
 *       The eviction floor: per batch of BATCH pages (contiguous), one pread
 *       from the memfd, one pwrite to OUT_PATH, fdatasync(OUT_PATH), one
 *       fallocate(PUNCH_HOLE | KEEP_SIZE) on the memfd and one UFFDIO_WAKE of
 *       the range.  Prints one JSON line: {"seconds": .., "bytes": ..}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static void die(const char *what)
{
	fprintf(stderr, "fault_c: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int guest(int sock, size_t size)
{
	int memfd = memfd_create("fault_c-guest", MFD_CLOEXEC);
	if (memfd < 0)
		die("memfd_create");
	if (ftruncate(memfd, (off_t)size) < 0)
		die("ftruncate");
	char *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (base == MAP_FAILED)
		die("mmap");
	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0)
		die("userfaultfd");

	uint64_t addr = (uint64_t)(uintptr_t)base;
	struct iovec iov = { .iov_base = &addr, .iov_len = sizeof(addr) };
	union {
		char buf[CMSG_SPACE(2 * sizeof(int))];
		struct cmsghdr align;
	} u;
	memset(&u, 0, sizeof(u));
	struct msghdr msg = {
		.msg_iov = &iov, .msg_iovlen = 1,
		.msg_control = u.buf, .msg_controllen = sizeof(u.buf),
	};
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(2 * sizeof(int));
	int fds[2] = { memfd, uffd };
	memcpy(CMSG_DATA(c), fds, sizeof(fds));
	if (sendmsg(sock, &msg, 0) < 0)
		die("sendmsg");
	close(sock);

	size_t npages = size / PAGE;
	uint64_t *lat = calloc(npages ? npages : 1, sizeof(uint64_t));
	uint64_t *start = calloc(npages ? npages : 1, sizeof(uint64_t));
	if (!lat || !start)
		die("calloc");
	char line[256];
	while (fgets(line, sizeof(line), stdin)) {
		if (line[0] == 'q')
			break;
		unsigned long first, count, stride;
		if (sscanf(line, "t %lu %lu %lu", &first, &count, &stride) != 3 || count > npages ||
		    first + (count ? count - 1 : 0) * stride >= npages) {
			fprintf(stderr, "fault_c: bad command: %s", line);
			return 2;
		}
		for (unsigned long k = 0; k < count; k++) {
			volatile char *p = base + (first + k * stride) * PAGE;
			uint64_t t0 = now_ns();
			(void)*p;
			uint64_t t1 = now_ns();
			start[k] = t0;
			lat[k] = t1 - t0;
		}
		for (unsigned long k = 0; k < count; k++)
			printf("%" PRIu64 " ", start[k]);
		for (unsigned long k = 0; k < count; k++)
			printf(k ? " %" PRIu64 : "%" PRIu64, lat[k]);
		printf("\n");
		fflush(stdout);
	}
	return 0;
}

static int handler(int uffd)
{
	static char page[PAGE] __attribute__((aligned(4096)));
	memset(page, 0x5a, sizeof(page));
	struct pollfd pfd[2] = { { .fd = uffd, .events = POLLIN }, { .fd = 0, .events = POLLIN } };
	struct uffd_msg msgs[16];
	for (;;) {
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (pfd[1].revents) {
			char b[64];
			if (read(0, b, sizeof(b)) <= 0)
				return 0;
		}
		if (!(pfd[0].revents & POLLIN))
			continue;
		ssize_t n = read(uffd, msgs, sizeof(msgs));
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			die("read uffd");
		}
		for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
				continue;
			struct uffdio_copy cp = {
				.dst = msgs[i].arg.pagefault.address & ~(PAGE - 1),
				.src = (uint64_t)(uintptr_t)page,
				.len = PAGE,
				.mode = 0,
			};
			if (ioctl(uffd, UFFDIO_COPY, &cp) < 0 && errno != EEXIST)
				die("UFFDIO_COPY");
		}
	}
}

static int evict(int memfd, int uffd, uint64_t base, size_t npages, size_t batch, const char *out)
{
	int ofd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (ofd < 0)
		die("open output");
	char *buf = aligned_alloc(PAGE, batch * PAGE);
	if (!buf)
		die("aligned_alloc");
	uint64_t t0 = now_ns();
	for (size_t first = 0; first < npages; first += batch) {
		size_t n = npages - first < batch ? npages - first : batch;
		off_t off = (off_t)(first * PAGE);
		size_t len = n * PAGE;
		if (pread(memfd, buf, len, off) != (ssize_t)len)
			die("pread");
		if (pwrite(ofd, buf, len, off) != (ssize_t)len)
			die("pwrite");
		if (fdatasync(ofd) < 0)
			die("fdatasync");
		if (fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, (off_t)len) < 0)
			die("fallocate");
		struct uffdio_range r = { .start = base + first * PAGE, .len = len };
		if (ioctl(uffd, UFFDIO_WAKE, &r) < 0)
			die("UFFDIO_WAKE");
	}
	uint64_t t1 = now_ns();
	close(ofd);
	free(buf);
	printf("{\"seconds\": %.9f, \"bytes\": %zu}\n", (double)(t1 - t0) / 1e9, npages * PAGE);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "guest"))
		return guest(atoi(argv[2]), strtoull(argv[3], NULL, 0));
	if (argc == 3 && !strcmp(argv[1], "handler"))
		return handler(atoi(argv[2]));
	if (argc == 8 && !strcmp(argv[1], "evict"))
		return evict(atoi(argv[2]), atoi(argv[3]), strtoull(argv[4], NULL, 0),
			     strtoull(argv[5], NULL, 0), strtoull(argv[6], NULL, 0), argv[7]);
	fprintf(stderr, "usage: fault_c guest SOCK_FD SIZE | handler UFFD_FD |\n"
			"       evict MEMFD UFFD_FD BASE NPAGES BATCH OUT_PATH\n");
	return 2;
}
