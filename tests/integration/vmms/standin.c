/* A stand-in for QEMU in the wsd attach tests: guest RAM in a memfd mapped
 * MAP_SHARED, written in a known pattern; a "hot" part is rewritten while it
 * runs.  Commands on stdin (one per line):
 *   check  -> re-read every page, print "ok PAGES" or "bad PAGE WORD"
 *   quit   -> exit 0
 * The main loop waits in poll() with a timeout, so a ptrace interrupt finds
 * it inside a syscall the kernel must restart (ERESTART_RESTARTBLOCK); an
 * EINTR seen here means the restart was broken and is reported as "eintr".
 * Usage: standin SIZE_MIB HOT_PAGES */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t word(uint64_t page, uint64_t w, uint32_t version)
{
	return (page * 0x9E3779B97F4A7C15ull) ^ (w << 32) ^ version;
}

static void fill(uint64_t *p, uint64_t page, uint32_t version)
{
	for (uint64_t w = 0; w < WORDS; w++)
		p[w] = word(page, w, version);
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	size_t npages = (size_t)atol(argv[1]) << 20 >> 12;
	size_t hot = (size_t)atol(argv[2]);
	int fd = memfd_create("wsd-standin", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, npages * PAGE) < 0)
		return perror("memfd"), 1;
	uint64_t *ram = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (ram == MAP_FAILED)
		return perror("mmap"), 1;
	uint32_t *versions = calloc(npages, sizeof *versions);
	for (size_t i = 0; i < npages; i++)
		fill(ram + i * WORDS, i, 0);
	printf("ready %d %p\n", getpid(), (void *)ram);
	fflush(stdout);
	char line[64];
	size_t next = 0;
	for (;;) {
		struct pollfd pfd = {.fd = 0, .events = POLLIN};
		int n = poll(&pfd, 1, 5);
		if (n < 0 && errno == EINTR) {
			printf("eintr\n");
			fflush(stdout);
			continue;
		}
		if (n < 0)
			return perror("poll"), 1;
		if (hot) { /* rewrite one hot page per round */
			size_t i = next++ % hot;
			fill(ram + i * WORDS, i, ++versions[i]);
		}
		if (n == 0)
			continue;
		if (!fgets(line, sizeof line, stdin) || !strncmp(line, "quit", 4))
			return 0;
		if (!strncmp(line, "check", 5)) {
			size_t bad = npages;
			uint64_t bad_w = 0;
			for (size_t i = 0; i < npages && bad == npages; i++)
				for (uint64_t w = 0; w < WORDS; w++)
					if (ram[i * WORDS + w] != word(i, w, versions[i])) {
						bad = i, bad_w = w;
						break;
					}
			if (bad == npages)
				printf("ok %zu\n", npages);
			else
				printf("bad %zu %lu\n", bad, (unsigned long)bad_w);
			fflush(stdout);
		}
	}
}
