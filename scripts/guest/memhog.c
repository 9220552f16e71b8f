/* SPDX-License-Identifier: GPL-2.0-or-later
 *
 * memhog - a guest-side memory workload for the vballoon VM tests.
 *
 * Built static on the host (gcc -static -O2 -Wall -Wextra -Werror) and put into
 * the test initramfs as /bin/memhog. Every mode writes every page it allocates,
 * so the memory is really backed by the guest (and so by the host).
 *
 * Usage:
 *   memhog touch MIB
 *       Allocate MIB MiB, write every page, read it back, free it, exit 0.
 *       Prints "touched MIB MiB ms=T". Exit 1 if the read back differs, 2 if
 *       the allocation fails.
 *
 *   memhog hold MIB SOCK [SEED]
 *       Allocate MIB MiB and fill it with a pattern derived from SEED (default 1;
 *       every 64-bit word is a function of SEED and its index). Then go to the
 *       background holding the memory and serving requests on the unix socket
 *       SOCK. Returns only once the memory is filled and SOCK accepts requests,
 *       so a caller needs no sleep: when the command is done, the daemon is there.
 *       Prints "held MIB MiB sum=HEX pid=PID".
 *
 *   memhog ask SOCK REQUEST
 *       Send REQUEST to the daemon behind SOCK, print its one-line answer and
 *       exit 0 (1 if the daemon answered an error, 2 if it cannot be reached).
 *       Requests:
 *         sum      re-read all held memory: "sum=HEX bad_pages=N mib=MIB"
 *                  (bad_pages counts pages whose content is not the pattern,
 *                  so "bad_pages=0" proves the held data survived)
 *         release  free the memory and exit: "released MIB MiB"
 *
 *   memhog fill [STEP_MIB [RESERVE_MIB]]
 *       Allocate and write STEP_MIB chunks (default 4) until an allocation
 *       fails or MemAvailable drops below RESERVE_MIB (default 8); print
 *       "filled N MiB" after every chunk (flushed, so the progress survives an
 *       OOM kill), then "fill done N MiB reason=enomem|reserve", free, exit 0.
 *
 *   memhog frag MIB
 *       Fragment free memory: allocate MIB MiB in 4 KiB pages (no huge pages),
 *       write them, then give back every other page and hold the rest in the
 *       background. Half of MIB becomes free memory in single 4 KiB pages whose
 *       neighbours are in use, so the buddy allocator cannot merge them.
 *       Prints "fragmented MIB MiB: holding H pages, freed F pages pid=PID";
 *       `kill PID` releases the rest.
 *
 * The checksum is FNV-1a over the 64-bit words, printed as 16 hex digits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)
#define PAGE 4096UL
#define WORDS_PER_PAGE (PAGE / sizeof(uint64_t))

static void die(const char *what)
{
	fprintf(stderr, "memhog: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: memhog touch MIB\n"
		"       memhog hold MIB SOCK [SEED]\n"
		"       memhog ask SOCK sum|release\n"
		"       memhog fill [STEP_MIB [RESERVE_MIB]]\n"
		"       memhog frag MIB\n");
	exit(2);
}

static unsigned long parse_ulong(const char *s, const char *what)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno || end == s || *end) {
		fprintf(stderr, "memhog: bad %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

/* splitmix64 of (seed, index): the expected value of word `index`. */
static uint64_t pattern(uint64_t seed, uint64_t index)
{
	uint64_t z = seed * 0x9e3779b97f4a7c15ULL + index + 1;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static uint64_t fnv_step(uint64_t h, uint64_t word)
{
	int i;

	for (i = 0; i < 8; i++) {
		h ^= (word >> (8 * i)) & 0xff;
		h *= 0x100000001b3ULL;
	}
	return h;
}

#define FNV_INIT 0xcbf29ce484222325ULL

static uint64_t *map_bytes(size_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

static void fill_pattern(uint64_t *mem, size_t words, uint64_t seed)
{
	size_t i;

	for (i = 0; i < words; i++)
		mem[i] = pattern(seed, i);
}

/* Checksum of mem[0..words); *bad counts pages that differ from the pattern. */
static uint64_t scan(const uint64_t *mem, size_t words, uint64_t seed, unsigned long *bad)
{
	uint64_t h = FNV_INIT;
	size_t i;
	int page_bad = 0;

	*bad = 0;
	for (i = 0; i < words; i++) {
		h = fnv_step(h, mem[i]);
		if (mem[i] != pattern(seed, i))
			page_bad = 1;
		if ((i + 1) % WORDS_PER_PAGE == 0) {
			*bad += page_bad;
			page_bad = 0;
		}
	}
	return h;
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmd_touch(unsigned long mib)
{
	size_t words = mib * MIB / sizeof(uint64_t);
	unsigned long bad;
	double t0 = now_ms();
	uint64_t *mem = map_bytes(mib * MIB);

	if (!mem)
		die("mmap");
	fill_pattern(mem, words, 7);
	scan(mem, words, 7, &bad);
	munmap(mem, mib * MIB);
	printf("touched %lu MiB ms=%.0f\n", mib, now_ms() - t0);
	if (bad) {
		printf("bad_pages=%lu\n", bad);
		return 1;
	}
	return 0;
}

static void sock_addr(struct sockaddr_un *sa, const char *path)
{
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(sa->sun_path)) {
		fprintf(stderr, "memhog: socket path too long: %s\n", path);
		exit(2);
	}
	strcpy(sa->sun_path, path);
}

static void serve(int lfd, uint64_t *mem, unsigned long mib, uint64_t seed)
{
	size_t words = mib * MIB / sizeof(uint64_t);
	char req[64], ans[160];

	for (;;) {
		int c = accept(lfd, NULL, NULL);
		ssize_t n;
		int release = 0;

		if (c < 0) {
			if (errno == EINTR)
				continue;
			exit(2);
		}
		n = read(c, req, sizeof(req) - 1);
		if (n < 0)
			n = 0;
		req[n] = 0;
		req[strcspn(req, "\r\n")] = 0;
		if (!strcmp(req, "sum")) {
			unsigned long bad;
			uint64_t h = scan(mem, words, seed, &bad);

			snprintf(ans, sizeof(ans), "sum=%016llx bad_pages=%lu mib=%lu\n",
				 (unsigned long long)h, bad, mib);
		} else if (!strcmp(req, "release")) {
			munmap(mem, mib * MIB);
			snprintf(ans, sizeof(ans), "released %lu MiB\n", mib);
			release = 1;
		} else {
			snprintf(ans, sizeof(ans), "error unknown request '%.40s'\n", req);
		}
		if (write(c, ans, strlen(ans)) < 0) {
			/* the asker went away; nothing to do */
		}
		close(c);
		if (release)
			exit(0);
	}
}

/*
 * Fork a daemon. The parent returns the child's pid once the child has left
 * the session and closed stdio (so the agent's command can end), or -1; the
 * child returns 0.
 */
static pid_t detach(void)
{
	int ready[2];
	pid_t pid;
	char c;

	if (pipe(ready) < 0)
		die("pipe");
	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid > 0) {
		close(ready[1]);
		if (read(ready[0], &c, 1) != 1)
			return -1;
		close(ready[0]);
		return pid;
	}
	close(ready[0]);
	setsid();
	signal(SIGHUP, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	if (!freopen("/dev/null", "r", stdin) || !freopen("/dev/null", "w", stdout) ||
	    !freopen("/dev/null", "w", stderr))
		exit(2);
	if (write(ready[1], "1", 1) != 1)
		exit(2);
	close(ready[1]);
	return 0;
}

static int cmd_hold(unsigned long mib, const char *path, uint64_t seed)
{
	size_t words = mib * MIB / sizeof(uint64_t);
	struct sockaddr_un sa;
	unsigned long bad;
	uint64_t h, *mem;
	int lfd;
	pid_t pid;

	mem = map_bytes(mib * MIB);
	if (!mem)
		die("mmap");
	fill_pattern(mem, words, seed);
	h = scan(mem, words, seed, &bad);

	sock_addr(&sa, path);
	unlink(path);
	lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0)
		die("socket");
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("bind");
	if (listen(lfd, 8) < 0)
		die("listen");
	/* The pages are private anonymous memory: they stay with the child. */
	pid = detach();
	if (pid < 0) {
		fprintf(stderr, "memhog: daemon did not start\n");
		return 2;
	}
	if (pid > 0) {
		printf("held %lu MiB sum=%016llx pid=%d\n", mib, (unsigned long long)h, (int)pid);
		return 0;
	}
	serve(lfd, mem, mib, seed);
	return 0;
}

static int cmd_ask(const char *path, const char *req)
{
	struct sockaddr_un sa;
	char ans[256];
	size_t got = 0;
	ssize_t n;
	int fd;

	sock_addr(&sa, path);
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket");
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("connect");
	if (write(fd, req, strlen(req)) < 0 || write(fd, "\n", 1) < 0)
		die("write");
	while (got < sizeof(ans) - 1 && (n = read(fd, ans + got, sizeof(ans) - 1 - got)) > 0)
		got += n;
	ans[got] = 0;
	close(fd);
	if (!got) {
		fprintf(stderr, "memhog: no answer\n");
		return 2;
	}
	fputs(ans, stdout);
	return strncmp(ans, "error", 5) ? 0 : 1;
}

static unsigned long mem_available_mib(void)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[128];
	unsigned long kib = 0;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "MemAvailable: %lu kB", &kib) == 1)
			break;
	fclose(f);
	return kib / 1024;
}

static int cmd_fill(unsigned long step, unsigned long reserve)
{
	unsigned long total = 0;
	const char *reason = "enomem";

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (;;) {
		uint64_t *chunk;

		if (mem_available_mib() < reserve + step) {
			reason = "reserve";
			break;
		}
		chunk = map_bytes(step * MIB);
		if (!chunk)
			break;
		/* Allocate the pages now, so failure is an error rather than an OOM kill. */
		if (madvise(chunk, step * MIB, MADV_POPULATE_WRITE) < 0) {
			munmap(chunk, step * MIB);
			break;
		}
		fill_pattern(chunk, step * MIB / sizeof(uint64_t), total);
		total += step;
		printf("filled %lu MiB\n", total);
	}
	printf("fill done %lu MiB reason=%s\n", total, reason);
	return 0;
}

static int cmd_frag(unsigned long mib)
{
	size_t bytes = mib * MIB, pages = bytes / PAGE, i;
	char *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	pid_t pid;

	if (mem == MAP_FAILED)
		die("mmap");
	/* 4 KiB pages only: a huge page would not free a 4 KiB hole at once. */
	madvise(mem, bytes, MADV_NOHUGEPAGE);
	for (i = 0; i < pages; i++)
		mem[i * PAGE] = (char)i;
	/* DONTNEED frees the page; munmap would split the mapping per hole. */
	for (i = 1; i < pages; i += 2)
		if (madvise(mem + i * PAGE, PAGE, MADV_DONTNEED))
			die("madvise");
	pid = detach();
	if (pid < 0)
		return 2;
	if (pid > 0) {
		printf("fragmented %lu MiB: holding %zu pages, freed %zu pages pid=%d\n",
		       mib, (pages + 1) / 2, pages / 2, (int)pid);
		return 0;
	}
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage();
	if (!strcmp(argv[1], "touch") && argc == 3)
		return cmd_touch(parse_ulong(argv[2], "MIB"));
	if (!strcmp(argv[1], "hold") && (argc == 4 || argc == 5))
		return cmd_hold(parse_ulong(argv[2], "MIB"), argv[3],
				argc == 5 ? parse_ulong(argv[4], "SEED") : 1);
	if (!strcmp(argv[1], "ask") && argc == 4)
		return cmd_ask(argv[2], argv[3]);
	if (!strcmp(argv[1], "fill") && argc <= 4)
		return cmd_fill(argc >= 3 ? parse_ulong(argv[2], "STEP_MIB") : 4,
				argc >= 4 ? parse_ulong(argv[3], "RESERVE_MIB") : 8);
	if (!strcmp(argv[1], "frag") && argc == 3)
		return cmd_frag(parse_ulong(argv[2], "MIB"));
	usage();
	return 2;
}
