/*
 * lks-vsock: a small AF_VSOCK tool for lockstep's Linux guest images
 * (busybox has none). Installed as /bin/lks-vsock in initramfs.cpio and
 * rootfs.ext4 by resources/build-linux-guests.sh.
 *
 *   lks-vsock connect <cid> <port> [--timeout SEC]
 *       Connect to <cid>:<port> (cid 2 = the host), copy stdin to the
 *       connection and the connection to stdout at the same time; at EOF on
 *       stdin half-close the connection (shutdown SHUT_WR); exit 0 once the
 *       peer has closed its side. Like `socat - VSOCK-CONNECT:cid:port`.
 *   lks-vsock listen <port> [--echo] [--once] [--timeout SEC]
 *       Listen on <port> (any CID), print "lks-vsock: listening on port
 *       <port>" on stderr once connections can be made, and accept one.
 *       Without --echo: relay it to stdin/stdout as `connect` does, then
 *       exit. With --echo: send back everything received until the peer's
 *       EOF, then close; serve one connection after another until killed,
 *       or only one with --once.
 *   lks-vsock cid
 *       Print this machine's CID (ioctl on /dev/vsock).
 *
 *   --timeout SEC: give up (exit 3) when nothing happened for SEC seconds
 *   (no connection to accept, no byte in either direction).
 *
 * Exit status: 0 success, 1 error (message on stderr, with the errno
 * name), 2 usage, 3 timeout.
 *
 * Freestanding on purpose: no C library, raw system calls. A static glibc
 * binary is ~700 KB, and on the PVM hosts every megabyte of initramfs costs
 * seconds of emulated unpacking and every touched page an emulated page
 * fault; this one is a few KB. Built with
 *   gcc -static -Os -nostdlib -ffreestanding -fno-pie -no-pie ...
 * Only kernel UAPI headers (linux-libc-dev) and glibc's <sys/socket.h> (for
 * constants and types; no function of it is called) are used.
 */
#include <linux/vm_sockets.h> /* includes <sys/socket.h> */
#include <linux/ioctl.h>
#include <asm/unistd.h>
#include <asm-generic/errno.h>

#define O_RDONLY 0
#define O_CLOEXEC 02000000
#define POLLIN 0x001
#define POLLERR 0x008
#define POLLHUP 0x010

struct lks_pollfd {
	int fd;
	short events;
	short revents;
};

/* ------------------------------------------------------------------------ */
/* System calls (x86_64)                                                     */

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}
#define SYS(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define SYS4(n, a, b, c, d) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define SYS6(n, a, b, c, d, e, f) \
	sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), (long)(f))

static __attribute__((noreturn)) void sys_exit(int code)
{
	for (;;)
		SYS(__NR_exit_group, code, 0, 0);
}

/* The compiler may emit calls to these even in freestanding code. */
void *memset(void *d, int c, unsigned long n)
{
	unsigned char *p = d;
	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	unsigned char *p = d;
	const unsigned char *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

/* ------------------------------------------------------------------------ */
/* Output                                                                    */

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* Write all of buf; 0 or -errno. */
static long write_all(int fd, const char *buf, long n, int is_socket)
{
	while (n > 0) {
		long w = is_socket ? SYS6(__NR_sendto, fd, buf, n, MSG_NOSIGNAL, 0, 0)
				   : SYS(__NR_write, fd, buf, n);
		if (w == -EINTR)
			continue;
		if (w < 0)
			return w;
		buf += w;
		n -= w;
	}
	return 0;
}

/* Messages go to stderr in one write() each, so that lines from several
 * processes on the console do not interleave. */
static char msg[512];
static unsigned long msg_len;

static void put(const char *s)
{
	while (*s && msg_len < sizeof(msg) - 1)
		msg[msg_len++] = *s++;
}

static void put_u(unsigned long v)
{
	char tmp[24];
	int i = sizeof(tmp);
	tmp[--i] = 0;
	do
		tmp[--i] = (char)('0' + v % 10);
	while ((v /= 10) && i > 0);
	put(tmp + i);
}

static void flush_line(int fd)
{
	put("\n");
	write_all(fd, msg, (long)msg_len, 0);
	msg_len = 0;
}

static const struct {
	int no;
	const char *name, *text;
} errnames[] = {
	{ EPERM, "EPERM", "Operation not permitted" },
	{ ENOENT, "ENOENT", "No such file or directory" },
	{ EINTR, "EINTR", "Interrupted system call" },
	{ EIO, "EIO", "I/O error" },
	{ EBADF, "EBADF", "Bad file descriptor" },
	{ EAGAIN, "EAGAIN", "Resource temporarily unavailable" },
	{ ENOMEM, "ENOMEM", "Out of memory" },
	{ EACCES, "EACCES", "Permission denied" },
	{ EFAULT, "EFAULT", "Bad address" },
	{ ENODEV, "ENODEV", "No such device" },
	{ EINVAL, "EINVAL", "Invalid argument" },
	{ EPIPE, "EPIPE", "Broken pipe" },
	{ ENOTSOCK, "ENOTSOCK", "Not a socket" },
	{ EPROTONOSUPPORT, "EPROTONOSUPPORT", "Protocol not supported" },
	{ EOPNOTSUPP, "EOPNOTSUPP", "Operation not supported" },
	{ EAFNOSUPPORT, "EAFNOSUPPORT", "Address family not supported (no vsock device/driver?)" },
	{ EADDRINUSE, "EADDRINUSE", "Address already in use" },
	{ EADDRNOTAVAIL, "EADDRNOTAVAIL", "Cannot assign requested address" },
	{ ENETUNREACH, "ENETUNREACH", "Network is unreachable" },
	{ ECONNABORTED, "ECONNABORTED", "Connection aborted" },
	{ ECONNRESET, "ECONNRESET", "Connection reset by peer (nobody listening?)" },
	{ ENOBUFS, "ENOBUFS", "No buffer space available" },
	{ ENOTCONN, "ENOTCONN", "Not connected" },
	{ ETIMEDOUT, "ETIMEDOUT", "Connection timed out" },
	{ ECONNREFUSED, "ECONNREFUSED", "Connection refused" },
	{ EHOSTUNREACH, "EHOSTUNREACH", "No route to host" },
};

/* Complete the message in msg with ": <text> (<ENAME>)" for -errno err and
 * write it to stderr; returns 1 (the exit code). */
static int fail_errno(long err)
{
	unsigned i;
	put(": ");
	for (i = 0; i < sizeof(errnames) / sizeof(errnames[0]); i++) {
		if (errnames[i].no == -err) {
			put(errnames[i].text);
			put(" (");
			put(errnames[i].name);
			put(")");
			break;
		}
	}
	if (i == sizeof(errnames) / sizeof(errnames[0])) {
		put("error ");
		put_u((unsigned long)-err);
	}
	flush_line(2);
	return 1;
}

/* "lks-vsock: <what>: <text> (<ENAME>)" on stderr; returns 1. */
static int fail(const char *what, long err)
{
	put("lks-vsock: ");
	put(what);
	return fail_errno(err);
}

static int usage(const char *why)
{
	if (why) {
		put("lks-vsock: ");
		put(why);
		flush_line(2);
	}
	put("usage: lks-vsock connect <cid> <port> [--timeout SEC]\n"
	    "       lks-vsock listen <port> [--echo] [--once] [--timeout SEC]\n"
	    "       lks-vsock cid");
	flush_line(2);
	return 2;
}

/* Decimal number up to 0xffffffff into *v; 0 on success. */
static int parse_u32(const char *s, unsigned *v)
{
	unsigned long n = 0;
	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		n = n * 10 + (unsigned long)(*s - '0');
		if (n > 0xffffffffUL)
			return -1;
	}
	*v = (unsigned)n;
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Relaying                                                                  */

static char buf[65536];
static int timeout_ms = -1;

/* 1 when fd is readable (or at EOF/error), 0 on timeout, -errno. */
static int wait_readable(int fd)
{
	struct lks_pollfd p = { fd, POLLIN, 0 };
	long r;
	do
		r = SYS(__NR_poll, &p, 1, timeout_ms);
	while (r == -EINTR);
	return (int)r;
}

static int timed_out(void)
{
	put("lks-vsock: timed out (nothing happened for ");
	put_u((unsigned long)timeout_ms / 1000);
	put(" s)");
	flush_line(2);
	return 3;
}

/*
 * Copy `in` to the socket and the socket to `out` until the socket reaches
 * EOF; at EOF on `in`, half-close the socket. With in < 0, only the socket
 * is read (and everything read is written back to it when echo is set).
 * Returns an exit code.
 */
static int relay(int sock, int in, int out, int echo)
{
	struct lks_pollfd p[2];
	int in_open = in >= 0;
	long r, n;

	for (;;) {
		p[0].fd = sock;
		p[0].events = POLLIN;
		p[0].revents = 0;
		p[1].fd = in_open ? in : -1;
		p[1].events = POLLIN;
		p[1].revents = 0;
		r = SYS(__NR_poll, p, 2, timeout_ms);
		if (r == -EINTR)
			continue;
		if (r < 0)
			return fail("poll", r);
		if (r == 0)
			return timed_out();
		if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
			n = SYS(__NR_read, in, buf, sizeof(buf));
			if (n == -EINTR || n == -EAGAIN)
				continue;
			if (n > 0) {
				r = write_all(sock, buf, n, 1);
				if (r < 0)
					return fail("send", r);
			} else {
				/* EOF (or an unreadable stdin): half-close. */
				in_open = 0;
				r = SYS(__NR_shutdown, sock, SHUT_WR, 0);
				if (r < 0 && r != -ENOTCONN)
					return fail("shutdown", r);
			}
		}
		if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
			n = SYS(__NR_read, sock, buf, sizeof(buf));
			if (n == -EINTR || n == -EAGAIN)
				continue;
			if (n < 0)
				return fail("receive", n);
			if (n == 0) {
				if (echo)
					SYS(__NR_shutdown, sock, SHUT_WR, 0);
				return 0;
			}
			r = echo ? write_all(sock, buf, n, 1) : write_all(out, buf, n, 0);
			if (r < 0)
				return fail(echo ? "send" : "write", r);
		}
	}
}

static void set_addr(struct sockaddr_vm *a, unsigned cid, unsigned port)
{
	memset(a, 0, sizeof(*a));
	a->svm_family = AF_VSOCK;
	a->svm_cid = cid;
	a->svm_port = port;
}

static void put_where(const char *verb, unsigned cid, unsigned port)
{
	put(verb);
	put(" cid ");
	put_u(cid);
	put(" port ");
	put_u(port);
}

static int cmd_connect(unsigned cid, unsigned port)
{
	struct sockaddr_vm a;
	long fd, r;

	fd = SYS(__NR_socket, AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return fail("socket(AF_VSOCK)", fd);
	set_addr(&a, cid, port);
	do
		r = SYS(__NR_connect, fd, &a, sizeof(a));
	while (r == -EINTR);
	if (r < 0) {
		put_where("lks-vsock: connect to", cid, port);
		return fail_errno(r);
	}
	return relay((int)fd, 0, 1, 0);
}

static int cmd_listen(unsigned port, int echo, int once)
{
	struct sockaddr_vm a;
	int peer_len;
	long fd, c, r;
	int rc;

	fd = SYS(__NR_socket, AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return fail("socket(AF_VSOCK)", fd);
	set_addr(&a, VMADDR_CID_ANY, port);
	r = SYS(__NR_bind, fd, &a, sizeof(a));
	if (r < 0)
		return fail("bind", r);
	r = SYS(__NR_listen, fd, 4, 0);
	if (r < 0)
		return fail("listen", r);
	put("lks-vsock: listening on port ");
	put_u(port);
	flush_line(2);
	for (;;) {
		r = wait_readable((int)fd);
		if (r == 0)
			return timed_out();
		if (r < 0)
			return fail("poll", r);
		peer_len = sizeof(a);
		c = SYS4(__NR_accept4, fd, &a, &peer_len, SOCK_CLOEXEC);
		if (c == -EINTR || c == -EAGAIN || c == -ECONNABORTED)
			continue;
		if (c < 0)
			return fail("accept", c);
		put_where("lks-vsock: connection from", a.svm_cid, a.svm_port);
		flush_line(2);
		rc = echo ? relay((int)c, -1, -1, 1) : relay((int)c, 0, 1, 0);
		SYS(__NR_close, c, 0, 0);
		if (!echo || once || rc != 0)
			return rc;
	}
}

static int cmd_cid(void)
{
	unsigned cid = 0;
	long fd, r;

	fd = SYS(__NR_open, "/dev/vsock", O_RDONLY | O_CLOEXEC, 0);
	if (fd < 0)
		return fail("open /dev/vsock", fd);
	r = SYS(__NR_ioctl, fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid);
	if (r < 0)
		return fail("ioctl IOCTL_VM_SOCKETS_GET_LOCAL_CID", r);
	put_u(cid);
	put("\n");
	write_all(1, msg, (long)msg_len, 0);
	msg_len = 0;
	return 0;
}

static int lks_main(int argc, char **argv)
{
	const char *pos[3];
	int npos = 0, echo = 0, once = 0, i;
	unsigned cid, port, secs;

	for (i = 1; i < argc; i++) {
		if (streq(argv[i], "--echo")) {
			echo = 1;
		} else if (streq(argv[i], "--once")) {
			once = 1;
		} else if (streq(argv[i], "--timeout")) {
			if (++i >= argc || parse_u32(argv[i], &secs) || secs == 0 || secs > 2000000)
				return usage("--timeout needs a number of seconds (1-2000000)");
			timeout_ms = (int)(secs * 1000);
		} else if (streq(argv[i], "-h") || streq(argv[i], "--help")) {
			usage(0);
			return 0;
		} else if (argv[i][0] == '-' && argv[i][1] == '-') {
			put("lks-vsock: unknown option ");
			put(argv[i]);
			flush_line(2);
			return usage(0);
		} else if (npos < 3) {
			pos[npos++] = argv[i];
		} else {
			return usage("too many arguments");
		}
	}
	if (npos == 0)
		return usage(0);
	if (streq(pos[0], "connect")) {
		if (npos != 3 || echo || once)
			return usage("connect takes <cid> <port>");
		if (parse_u32(pos[1], &cid))
			return usage("bad cid (a number; 2 = the host)");
		if (parse_u32(pos[2], &port))
			return usage("bad port (a number)");
		return cmd_connect(cid, port);
	}
	if (streq(pos[0], "listen")) {
		if (npos != 2)
			return usage("listen takes <port>");
		if (parse_u32(pos[1], &port))
			return usage("bad port (a number)");
		return cmd_listen(port, echo, once);
	}
	if (streq(pos[0], "cid") && npos == 1 && !echo && !once)
		return cmd_cid();
	return usage("unknown command");
}

/* Entry: the kernel leaves argc at (%rsp), argv after it; %rsp is 16-byte
 * aligned, so the call below gives lks_start a normally aligned stack. */
__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	xor %ebp, %ebp\n"
	"	mov %rsp, %rdi\n"
	"	call lks_start\n"
	"	hlt\n");

__attribute__((used, noreturn)) void lks_start(long *sp)
{
	sys_exit(lks_main((int)sp[0], (char **)(sp + 1)));
}
