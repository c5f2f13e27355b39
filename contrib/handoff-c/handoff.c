/* The wsd hand-off from a VMM, in C: what a VMM author adds (docs/protocol.md).
 *
 *   gcc -O2 -Wall -o handoff handoff.c && ./handoff /run/wsd/wsd.sock vm-1 64
 *
 * Guest RAM is a memfd mapped MAP_SHARED; the userfaultfd is created raw (no
 * UFFDIO_API: wsd negotiates the features).  Both go to wsd with SCM_RIGHTS on
 * one JSON line; wsd answers with one JSON line.  The VMM keeps its copy of
 * the uffd and the connection open for as long as wsd should manage the memory.
 * This example writes a pattern, waits for a line on stdin (wsd evicts
 * meanwhile), checks the pattern and exits, which ends the session. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#define die(what) do { perror(what); exit(1); } while (0)

int main(int argc, char **argv)
{
	if (argc != 4)
		return fprintf(stderr, "usage: %s SOCKET VM_ID SIZE_MIB\n", argv[0]), 2;
	size_t size = (size_t)atol(argv[3]) << 20;

	int memfd = memfd_create("guest-ram", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, size) < 0)
		die("memfd");
	uint64_t *ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (ram == MAP_FAILED)
		die("mmap");
	/* Not UFFD_USER_MODE_ONLY: under KVM, kernel-side faults would get SIGBUS. */
	int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0)
		die("userfaultfd");

	int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
	if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
		die("connect");

	/* fd_index 0 is the uffd, 1 the memfd: their order in SCM_RIGHTS below. */
	char msg[512];
	int len = snprintf(msg, sizeof msg,
		"{\"type\":\"handoff\",\"version\":1,\"vm_id\":\"%s\",\"vmm_pid\":%d,"
		"\"uffd\":{\"fd_index\":0,\"state\":\"raw\"},\"regions\":[{\"guest_phys_addr\":0,"
		"\"host_virt_addr\":%lu,\"size\":%zu,\"fd_index\":1,\"offset\":0,\"page_size\":4096}]}\n",
		argv[2], getpid(), (unsigned long)ram, size);
	int fds[2] = {uffd, memfd};
	char cbuf[CMSG_SPACE(sizeof fds)] = {0};
	struct iovec iov = {.iov_base = msg, .iov_len = (size_t)len};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
			    .msg_control = cbuf, .msg_controllen = sizeof cbuf};
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof fds);
	memcpy(CMSG_DATA(c), fds, sizeof fds);
	if (sendmsg(sock, &mh, 0) != len)  /* a short send would need the rest sent */
		die("sendmsg");

	char reply[4096];
	ssize_t n = read(sock, reply, sizeof reply - 1);  /* one line: accepted or error */
	if (n <= 0)
		die("read");
	reply[n] = 0;
	printf("%s", reply);
	fflush(stdout);
	if (!strstr(reply, "\"accepted\""))
		return 1;

	for (size_t i = 0; i < size / 8; i++)
		ram[i] = i * 0x9E3779B97F4A7C15ull;
	getchar();  /* wsd tracks and evicts while we wait */
	for (size_t i = 0; i < size / 8; i++)
		if (ram[i] != i * 0x9E3779B97F4A7C15ull)
			return printf("bad word %zu\n", i), 1;
	printf("ok %zu bytes verified\n", size);
	return 0;  /* exiting closes the connection (ending the session) and the uffd */
}
