/*
 * xenshim: lets Debian's real xenstored (Xen 4.17, C) run on a machine
 * without Xen, for the integration tests of package xenstore.
 *
 * xenstored talks to the hypervisor through libxenctrl, libxenevtchn and
 * libxengnttab, and to dom0's kernel through /proc/xen/xsd_{port,kva}. Its
 * --no-domain-init option does not help: the node database is only created
 * when dom0 is introduced, so the first request crashes it. This library,
 * loaded with LD_PRELOAD, answers those calls instead:
 *
 *   - every domain ID below DOMID_FIRST_RESERVED exists, unless the file
 *     $XENSHIM_DIR/dead-<domid> does, in which case it is dying;
 *   - dom0's xenstore page is anonymous memory nobody writes;
 *   - the xenstore page of another domain (XS_INTRODUCE) is the file
 *     $XENSHIM_DIR/ring-<domid>, mapped shared, so that a test can map it
 *     too and speak the ring protocol as that guest;
 *   - the event channel device is the FIFO $XENSHIM_DIR/evtchn: a test
 *     writes a 4-byte port number to wake xenstored (port 1 is the
 *     VIRQ_DOM_EXC port, which makes xenstored look for dead domains);
 *     notifications from xenstored go nowhere, the test polls the ring.
 *
 * Everything xenstored does with requests, permissions, quotas,
 * transactions and watches is its own code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define DOMID_FIRST_RESERVED 0x7ff0
#define VIRQ_PORT 1

static const char *dir(void)
{
	const char *d = getenv("XENSHIM_DIR");
	return d ? d : ".";
}

static int memfile(const char *name, const void *data, size_t len, size_t size)
{
	int fd = memfd_create(name, 0);
	if (fd < 0 || ftruncate(fd, size) < 0)
		return -1;
	if (len && pwrite(fd, data, len, 0) != (ssize_t)len)
		return -1;
	return fd;
}

/* The files of dom0's kernel that xenstored opens at start. */
static int fake_open(const char *path)
{
	if (!strcmp(path, "/proc/xen/xsd_port"))
		return memfile("xsd_port", "9", 1, 1);
	if (!strcmp(path, "/proc/xen/xsd_kva"))
		return memfile("xsd_kva", NULL, 0, 4096);
	return -2;
}

static int real_open(const char *path, int flags, va_list ap)
{
	int mode = (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, int) : 0;
	int fd = fake_open(path);
	if (fd != -2)
		return fd;
	return syscall(SYS_openat, AT_FDCWD, path, flags, mode);
}

int open(const char *path, int flags, ...)
{
	va_list ap;
	va_start(ap, flags);
	int fd = real_open(path, flags, ap);
	va_end(ap);
	return fd;
}

int open64(const char *path, int flags, ...)
{
	va_list ap;
	va_start(ap, flags);
	int fd = real_open(path, flags, ap);
	va_end(ap);
	return fd;
}

/* libxenctrl */

void *xc_interface_open(void *logger, void *dombuild_logger, unsigned flags)
{
	return malloc(1);
}

int xc_interface_close(void *xch)
{
	return 0;
}

/* Fills the head of xc_dominfo_t: domid, ssidref, then the flag bits
 * (dying is bit 0). The rest stays as the caller left it. */
int xc_domain_getinfo(void *xch, uint32_t first, unsigned int max, void *info)
{
	char path[4096];
	struct stat st;
	uint32_t *w = info;

	if (max < 1 || first >= DOMID_FIRST_RESERVED)
		return 0;
	snprintf(path, sizeof(path), "%s/dead-%u", dir(), first);
	w[0] = first;
	w[1] = 0;
	w[2] = stat(path, &st) == 0 ? 1 : 0;
	return 1;
}

/* libxenevtchn */

struct evtchn {
	int fd;
	int next;
};

void *xenevtchn_open(void *logger, unsigned flags)
{
	char path[4096];
	struct evtchn *e = calloc(1, sizeof(*e));

	snprintf(path, sizeof(path), "%s/evtchn", dir());
	if (mkfifo(path, 0600) < 0 && errno != EEXIST)
		return NULL;
	e->fd = syscall(SYS_openat, AT_FDCWD, path, O_RDWR | O_NONBLOCK, 0);
	if (e->fd < 0)
		return NULL;
	e->next = VIRQ_PORT + 1;
	return e;
}

void *xenevtchn_fdopen(void *logger, int fd, unsigned flags)
{
	return xenevtchn_open(logger, flags);
}

int xenevtchn_fd(void *h)
{
	return ((struct evtchn *)h)->fd;
}

int xenevtchn_bind_virq(void *h, unsigned int virq)
{
	return VIRQ_PORT;
}

int xenevtchn_bind_interdomain(void *h, uint32_t domid, unsigned int remote)
{
	return ((struct evtchn *)h)->next++;
}

int xenevtchn_notify(void *h, unsigned int port)
{
	return 0;
}

/* Called when the FIFO is readable: the port a test wrote. */
int xenevtchn_pending(void *h)
{
	uint32_t port;
	if (read(((struct evtchn *)h)->fd, &port, sizeof(port)) != sizeof(port))
		return 0; /* a spurious wake-up: any port but VIRQ_PORT */
	return port;
}

int xenevtchn_unmask(void *h, unsigned int port)
{
	return 0;
}

int xenevtchn_unbind(void *h, unsigned int port)
{
	return 0;
}

/* libxengnttab */

void *xengnttab_open(void *logger, unsigned flags)
{
	return malloc(1);
}

int xengnttab_close(void *h)
{
	return 0;
}

int xengnttab_set_max_grants(void *h, uint32_t count)
{
	return 0;
}

void *xengnttab_map_grant_ref(void *h, uint32_t domid, uint32_t ref, int prot)
{
	char path[4096];
	void *p;
	int fd;

	snprintf(path, sizeof(path), "%s/ring-%u", dir(), domid);
	fd = syscall(SYS_openat, AT_FDCWD, path, O_RDWR, 0);
	if (fd < 0)
		return NULL;
	p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	return p == MAP_FAILED ? NULL : p;
}

int xengnttab_unmap(void *h, void *addr, uint32_t count)
{
	return munmap(addr, 4096);
}
