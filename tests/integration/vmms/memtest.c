/* The guest side of the QEMU end-to-end test: init runs it on the serial
 * console.  It fills SIZE_MIB of anonymous memory with a known pattern and
 * prints a checksum; then, for every line read from the console, it re-reads
 * all of it and reports whether every word is still as written.  Static, so
 * the initramfs needs nothing else but busybox.  Usage: memtest SIZE_MIB */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t word(uint64_t i)
{
	return (i * 0x9E3779B97F4A7C15ull) ^ (i >> 7) ^ 0x5753442d61747461ull;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	size_t size = (size_t)atol(argc > 1 ? argv[1] : "64") << 20, n = size / 8;
	uint64_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return printf("MEMTEST ERROR mmap\n"), 1;
	double t = now();
	uint64_t sum = 0;
	for (size_t i = 0; i < n; i++)
		sum += mem[i] = word(i);
	printf("MEMTEST FILLED mib=%zu checksum=%016llx seconds=%.1f\n", size >> 20,
	       (unsigned long long)sum, now() - t);
	fflush(stdout);
	char line[64];
	while (fgets(line, sizeof line, stdin)) {
		t = now();
		uint64_t again = 0;
		size_t bad = 0, first = 0;
		for (size_t i = 0; i < n; i++) {
			again += mem[i];
			if (mem[i] != word(i) && !bad++)
				first = i;
		}
		if (bad || again != sum)
			printf("MEMTEST VERIFY BAD words=%zu first=%zu checksum=%016llx\n", bad, first,
			       (unsigned long long)again);
		else
			printf("MEMTEST VERIFY OK mib=%zu checksum=%016llx seconds=%.1f\n", size >> 20,
			       (unsigned long long)again, now() - t);
		fflush(stdout);
	}
	for (;;)
		pause();
}
