/*
 * pytest-cpr's ioctl fault shim: LD_PRELOAD into one QEMU process to fail one ioctl, once.
 *
 * Environment (set by pytest_cpr.ioctl_faults, which also builds this file):
 *   CPR_IOCTL_FAULT      "<request>:<flags offset>:<flags mask>:<errno>" (strtoul base 0): an ioctl
 *                        with this request number whose argument holds all of the mask's bits in the
 *                        32-bit word at the offset (mask 0: any argument) fails with the errno
 *   CPR_IOCTL_FAULT_ARM  a file: the fault strikes only while it exists; the shim removes it when
 *                        it strikes (unlink is the claim, so one call fails per arming, whatever
 *                        the thread)
 *   CPR_IOCTL_FAULT_LOG  a file: one line when the shim is loaded, one per failed call
 * Every other ioctl goes to the C library's unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int (*ioctl_fn)(int, unsigned long, ...);

static ioctl_fn real_ioctl;
static unsigned long want_request;
static unsigned long flags_offset;
static uint32_t flags_mask;
static int fail_errno;
static int configured;

static void note(const char *fmt, ...)
{
    const char *path = getenv("CPR_IOCTL_FAULT_LOG");
    char line[256];
    va_list ap;
    int fd, n;

    if (path == NULL || *path == '\0') {
        return;
    }
    va_start(ap, fmt);
    n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (n <= 0) {
        return;
    }
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        ssize_t written = write(fd, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
        (void)written;
        close(fd);
    }
}

__attribute__((constructor)) static void setup(void)
{
    const char *spec = getenv("CPR_IOCTL_FAULT");
    char *end;

    real_ioctl = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    if (spec == NULL || *spec == '\0') {
        return;
    }
    want_request = strtoul(spec, &end, 0);
    if (*end == ':') {
        flags_offset = strtoul(end + 1, &end, 0);
    }
    if (*end == ':') {
        flags_mask = (uint32_t)strtoul(end + 1, &end, 0);
    }
    if (*end == ':') {
        fail_errno = (int)strtol(end + 1, &end, 0);
    }
    if (*end != '\0' || fail_errno <= 0) {
        note("cpr-ioctl-fault: pid %d: bad CPR_IOCTL_FAULT '%s', shim inactive\n", (int)getpid(), spec);
        return;
    }
    configured = 1;
    note("cpr-ioctl-fault: loaded in pid %d: request 0x%lx, flags 0x%x at offset %lu, errno %d\n",
         (int)getpid(), want_request, flags_mask, flags_offset, fail_errno);
}

static int strikes(unsigned long request, void *arg)
{
    const char *arm;
    uint32_t flags = 0;

    if (!configured || request != want_request) {
        return 0;
    }
    if (flags_mask != 0) {
        if (arg == NULL) {
            return 0;
        }
        memcpy(&flags, (const char *)arg + flags_offset, sizeof(flags));
        if ((flags & flags_mask) != flags_mask) {
            return 0;
        }
    }
    arm = getenv("CPR_IOCTL_FAULT_ARM");
    if (arm == NULL || *arm == '\0' || unlink(arm) != 0) {
        return 0;
    }
    note("cpr-ioctl-fault: pid %d: failed ioctl 0x%lx (flags 0x%x) with errno %d\n", (int)getpid(), request,
         flags, fail_errno);
    return 1;
}

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    void *arg;

    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (strikes(request, arg)) {
        errno = fail_errno;
        return -1;
    }
    if (real_ioctl == NULL) {
        real_ioctl = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    }
    return real_ioctl(fd, request, arg);
}
