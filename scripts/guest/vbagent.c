/* SPDX-License-Identifier: GPL-2.0-or-later
 *
 * vbagent - the guest half of the vballoon test command channel.
 *
 * Built static on the host (gcc -static -O2 -Wall -Wextra -Werror), started by
 * the initramfs /init as `vbagent /dev/ttyS1`. The host half is
 * vballoon/guest_agent.py. The port carries nothing else: kernel messages go to
 * the console on ttyS0.
 *
 * Protocol, one line per message, fields separated by one space:
 *
 *   host -> guest  VBC <id> <timeout_ms> <base64 command> [<base64 stdin>]
 *   guest -> host  VBR <id> <rc> <state> <base64 output>
 *
 * <id> is 1-32 characters of [A-Za-z0-9_-]. The command runs as
 * `/bin/sh -c <command>` in its own process group with stdin from the given
 * bytes (or empty) and stdout+stderr captured together (at most 4 MiB).
 * <state> is "exit" (rc = exit status), "signal" (rc = 128 + signal),
 * "timeout" (the process group was killed after timeout_ms; rc = -1) or
 * "error" (the agent could not run it; the output says why; rc = -1).
 * Commands run one at a time, in the order received. A line that is not a
 * well-formed request is ignored; since boot noise may prefix a request, the
 * last "VBC " in a line starts the request. Background processes a command
 * starts keep running after its reply (start them with their output
 * redirected, or they write into the captured output of that command only).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_LINE (32UL * 1024 * 1024)
#define MAX_OUTPUT (4UL * 1024 * 1024)

static int tty = -1;

static const char b64chars[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int b64val(int c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/* Decode src (NUL-terminated) in place semantics into a new buffer; -1 if malformed. */
static ssize_t b64decode(const char *src, char **out)
{
	size_t len = strlen(src), i, o = 0;
	char *buf;

	if (len % 4)
		return -1;
	buf = malloc(len / 4 * 3 + 1);
	if (!buf)
		return -1;
	for (i = 0; i < len; i += 4) {
		int a = b64val(src[i]), b = b64val(src[i + 1]);
		int c = src[i + 2] == '=' ? 0 : b64val(src[i + 2]);
		int d = src[i + 3] == '=' ? 0 : b64val(src[i + 3]);
		int pad = (src[i + 2] == '=') + (src[i + 3] == '=');

		if (a < 0 || b < 0 || c < 0 || d < 0 || (pad && i + 4 != len) ||
		    (src[i + 2] == '=' && src[i + 3] != '=')) {
			free(buf);
			return -1;
		}
		buf[o++] = (char)(a << 2 | b >> 4);
		if (pad < 2)
			buf[o++] = (char)((b & 15) << 4 | c >> 2);
		if (pad < 1)
			buf[o++] = (char)((c & 3) << 6 | d);
	}
	buf[o] = 0;
	*out = buf;
	return (ssize_t)o;
}

static char *b64encode(const unsigned char *src, size_t len)
{
	char *out = malloc((len + 2) / 3 * 4 + 1), *p = out;
	size_t i;

	if (!out)
		return NULL;
	for (i = 0; i + 2 < len; i += 3) {
		*p++ = b64chars[src[i] >> 2];
		*p++ = b64chars[(src[i] & 3) << 4 | src[i + 1] >> 4];
		*p++ = b64chars[(src[i + 1] & 15) << 2 | src[i + 2] >> 6];
		*p++ = b64chars[src[i + 2] & 63];
	}
	if (i < len) {
		*p++ = b64chars[src[i] >> 2];
		if (i + 1 < len) {
			*p++ = b64chars[(src[i] & 3) << 4 | src[i + 1] >> 4];
			*p++ = b64chars[(src[i + 1] & 15) << 2];
		} else {
			*p++ = b64chars[(src[i] & 3) << 4];
			*p++ = '=';
		}
		*p++ = '=';
	}
	*p = 0;
	return out;
}

static void write_all(const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(tty, buf, len);

		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return;
		}
		buf += n;
		len -= (size_t)n;
	}
}

static void reply(const char *id, int rc, const char *state, const unsigned char *out, size_t len)
{
	char head[96];
	char *enc = b64encode(out, len);

	snprintf(head, sizeof(head), "VBR %s %d %s ", id, rc, state);
	write_all(head, strlen(head));
	if (enc)
		write_all(enc, strlen(enc));
	write_all("\n", 1);
	free(enc);
}

static void reply_error(const char *id, const char *msg)
{
	reply(id, -1, "error", (const unsigned char *)msg, strlen(msg));
}

static int valid_id(const char *id)
{
	size_t n = strlen(id), i;

	if (n < 1 || n > 32)
		return 0;
	for (i = 0; i < n; i++)
		if (!(id[i] >= 'A' && id[i] <= 'Z') && !(id[i] >= 'a' && id[i] <= 'z') &&
		    !(id[i] >= '0' && id[i] <= '9') && id[i] != '_' && id[i] != '-')
			return 0;
	return 1;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void run(const char *id, long timeout_ms, const char *cmd, const char *in, size_t inlen)
{
	int outfd = memfd_create("vbagent-out", MFD_CLOEXEC);
	int infd = memfd_create("vbagent-in", MFD_CLOEXEC);
	sigset_t chld, old;
	double deadline = now_s() + timeout_ms / 1e3;
	const char *state = "exit";
	int status = 0, rc;
	pid_t pid;
	struct stat st;
	unsigned char *out;
	size_t outlen;
	ssize_t got;

	if (outfd < 0 || infd < 0 || (inlen && write(infd, in, inlen) != (ssize_t)inlen)) {
		reply_error(id, "vbagent: cannot create capture files");
		goto close;
	}
	lseek(infd, 0, SEEK_SET);
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, &old);
	pid = fork();
	if (pid < 0) {
		sigprocmask(SIG_SETMASK, &old, NULL);
		reply_error(id, "vbagent: fork failed");
		goto close;
	}
	if (pid == 0) {
		setpgid(0, 0);
		sigprocmask(SIG_SETMASK, &old, NULL);
		signal(SIGPIPE, SIG_DFL);
		dup2(infd, 0);
		dup2(outfd, 1);
		dup2(outfd, 2);
		execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
		_exit(127);
	}
	setpgid(pid, pid);
	for (;;) {
		pid_t w = waitpid(pid, &status, WNOHANG);
		double left = deadline - now_s();
		struct timespec ts;

		if (w == pid)
			break;
		if (left <= 0) {
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
			state = "timeout";
			break;
		}
		ts.tv_sec = (time_t)left;
		ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
		sigtimedwait(&chld, NULL, &ts);
	}
	sigprocmask(SIG_SETMASK, &old, NULL);

	if (!strcmp(state, "timeout"))
		rc = -1;
	else if (WIFSIGNALED(status)) {
		state = "signal";
		rc = 128 + WTERMSIG(status);
	} else {
		rc = WEXITSTATUS(status);
	}

	if (fstat(outfd, &st) < 0)
		st.st_size = 0;
	outlen = (size_t)st.st_size > MAX_OUTPUT ? MAX_OUTPUT : (size_t)st.st_size;
	out = malloc(outlen + 1);
	got = out ? pread(outfd, out, outlen, 0) : -1;
	if (got < 0)
		got = 0;
	reply(id, rc, state, out, (size_t)got);
	free(out);
close:
	if (outfd >= 0)
		close(outfd);
	if (infd >= 0)
		close(infd);
}

/* Handle one received line (without its newline). */
static void handle(char *line)
{
	char *req = NULL, *p, *fields[5] = {0};
	char *cmd = NULL, *in = NULL, *end;
	ssize_t inlen = 0;
	long timeout_ms;
	int n = 0;

	for (p = line; (p = strstr(p, "VBC ")); p++)
		req = p;
	if (!req)
		return;
	for (p = strtok(req, " \r"); p && n < 5; p = strtok(NULL, " \r"))
		fields[n++] = p;
	if (strtok(NULL, " \r"))
		return;
	if (n < 4 || !valid_id(fields[1]))
		return;
	errno = 0;
	timeout_ms = strtol(fields[2], &end, 10);
	if (errno || *end || timeout_ms <= 0)
		return;
	if (b64decode(fields[3], &cmd) < 0)
		return;
	if (n == 5 && (inlen = b64decode(fields[4], &in)) < 0) {
		free(cmd);
		return;
	}
	run(fields[1], timeout_ms, cmd, in, (size_t)inlen);
	free(cmd);
	free(in);
}

int main(int argc, char **argv)
{
	struct termios t;
	char *buf;
	size_t len = 0, cap = 65536;

	if (argc != 2) {
		fprintf(stderr, "usage: vbagent TTY\n");
		return 2;
	}
	tty = open(argv[1], O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (tty < 0) {
		perror("vbagent: open");
		return 1;
	}
	if (tcgetattr(tty, &t) == 0) {
		cfmakeraw(&t);
		cfsetispeed(&t, B115200);
		cfsetospeed(&t, B115200);
		t.c_cflag |= CLOCAL | CREAD;
		t.c_cc[VMIN] = 1;
		t.c_cc[VTIME] = 0;
		tcsetattr(tty, TCSANOW, &t);
	}
	signal(SIGPIPE, SIG_IGN);
	buf = malloc(cap);
	if (!buf)
		return 1;
	write_all("\nVBHELLO\n", 9);
	for (;;) {
		ssize_t n;
		char *nl;

		if (cap - len < 4096) {
			char *nb;

			if (cap >= MAX_LINE) {
				len = 0; /* an endless line: drop it */
				continue;
			}
			nb = realloc(buf, cap * 2);
			if (!nb)
				return 1;
			buf = nb;
			cap *= 2;
		}
		n = read(tty, buf + len, cap - len - 1);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			perror("vbagent: read");
			return 1;
		}
		if (n == 0)
			continue;
		len += (size_t)n;
		buf[len] = 0;
		while ((nl = memchr(buf, '\n', len))) {
			size_t linelen = (size_t)(nl - buf);

			*nl = 0;
			handle(buf);
			memmove(buf, nl + 1, len - linelen - 1);
			len -= linelen + 1;
			buf[len] = 0;
		}
	}
}
