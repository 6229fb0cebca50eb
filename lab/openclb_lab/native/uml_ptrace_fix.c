/*
 * LD_PRELOAD shim for Debian's linux.uml (6.1) on CPUs with a large XSAVE area.
 *
 * UML hands PTRACE_SETREGSET(NT_X86_XSTATE) its own fixed 2,696-byte buffer;
 * hosts whose XSAVE area is larger (AVX-512/AMX: ~11 KB) reject the short
 * buffer with EFAULT and the guest panics at the first exec of init
 * ("ptrace set fp regs failed, errno = 14"). Fix: read the full state first,
 * overlay UML's shorter buffer on its start, write the full buffer back.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif
#define FULL_XSTATE_MAX (64 * 1024)

typedef long (*ptrace_fn)(enum __ptrace_request, pid_t, void *, void *);

long ptrace(enum __ptrace_request req, ...)
{
    static ptrace_fn real;
    va_list ap;
    va_start(ap, req);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if (!real)
        real = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");

    if (req == PTRACE_SETREGSET && (long)addr == NT_X86_XSTATE && data) {
        struct iovec *uml = data;
        static __thread unsigned char full[FULL_XSTATE_MAX] __attribute__((aligned(64)));
        struct iovec iov = { full, sizeof(full) };
        if (real(PTRACE_GETREGSET, pid, addr, &iov) == 0 && iov.iov_len > uml->iov_len) {
            memcpy(full, uml->iov_base, uml->iov_len);
            return real(PTRACE_SETREGSET, pid, addr, &iov);
        }
    }
    return real(req, pid, addr, data);
}
