"""cffi declarations of the userfaultfd and pagemap uAPI of Linux 7.3, built at install.

``setup.py`` names this file in ``cffi_modules``: ``pip install`` (and
``tools/bootstrap.sh``) writes ``wsd.kernel._uapi``, cffi's out-of-line ABI
mode, a Python module with the declarations already parsed.  Parsing them at
every start instead (in-line ABI mode) loads pycparser: about 90 ms of a 0.8 s
start on the development host, a tenth.

The struct layouts are transcribed from include/uapi/linux/userfaultfd.h and
include/uapi/linux/fs.h of Linux 7.3; tests/unit/test_kernel_abi.py pins their
sizes and offsets, and the ioctl numbers as gcc computes them from those headers.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
struct uffdio_api      { uint64_t api; uint64_t features; uint64_t ioctls; };
struct uffdio_range    { uint64_t start; uint64_t len; };
struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
struct uffdio_copy     { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t copy; };
struct uffdio_zeropage { struct uffdio_range range; uint64_t mode; int64_t zeropage; };
struct uffdio_writeprotect { struct uffdio_range range; uint64_t mode; };
struct uffdio_continue { struct uffdio_range range; uint64_t mode; int64_t mapped; };
struct uffdio_poison   { struct uffdio_range range; uint64_t mode; int64_t updated; };
struct uffdio_rwprotect { struct uffdio_range range; uint64_t mode; };
struct uffdio_move     { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t move; };
struct uffdio_set_mode { uint64_t enable; uint64_t disable; };

struct uffd_msg {
    uint8_t  event;
    uint8_t  reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    union {
        struct { uint64_t flags; uint64_t address; union { uint32_t ptid; } feat; } pagefault;
        struct { uint32_t ufd; } fork;
        struct { uint64_t from; uint64_t to; uint64_t len; } remap;
        struct { uint64_t start; uint64_t end; } remove;
        struct { uint64_t reserved1; uint64_t reserved2; uint64_t reserved3; } reserved;
    } arg;
};

struct page_region { uint64_t start; uint64_t end; uint64_t categories; };
struct pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

long syscall(long number, ...);
int ioctl(int fd, unsigned long request, ...);
int fallocate(int fd, int mode, int64_t offset, int64_t len);
int fstatfs(int fd, void *buf);

struct iovec { void *iov_base; size_t iov_len; };
ssize_t vmsplice(int fd, const struct iovec *iov, size_t nr_segs, unsigned int flags);
ssize_t tee(int fd_in, int fd_out, size_t len, unsigned int flags);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset);
int munmap(void *addr, size_t length);

/* x86_64 only (arch/x86/include/asm/user_64.h): PTRACE_GETREGS/SETREGS. */
struct user_regs_struct {
    unsigned long r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8;
    unsigned long rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs, eflags, rsp, ss;
    unsigned long fs_base, gs_base, ds, es, fs, gs;
};
long ptrace(int request, ...);
"""

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source("wsd.kernel._uapi", None)

if __name__ == "__main__":
    ffi.compile(verbose=True)
