/* fd life-cycle checks for tests/compat.rs, run under LD_PRELOAD=libvhdio.so.
 *
 * usage: fdcheck IMAGE PLAIN OFF WOFF
 *
 * Prints one `key=value` line per check; the Rust side knows the expected
 * values (bytes as lower-case hex, from qemu-img's raw conversion). Nothing
 * here decides pass or fail, so a wrong answer shows what the program saw.
 *   - an image fd closed behind the library's back (fclose of an fdopen or
 *     fopen stream, closefrom, close_range, a raw close or dup3 syscall) and
 *     the number reused by a regular file or a pipe: reads, writes and fstat
 *     must reach that file;
 *   - the library's own fds survive closefrom/close_range/close loops above
 *     the image fd (reads and a write at WOFF still work);
 *   - dup shares the offset, SEEK_END is the virtual size, F_GETFL reports
 *     the access mode asked for, a read-only mmap holds the disk's bytes;
 *   - O_CLOEXEC: an exec'ed child does not get the fd; without it, the child
 *     reads the virtual disk at the inherited offset.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void hex(const char *key, const unsigned char *b, long n, int err) {
    printf("%s=", key);
    if (n < 0)
        printf("ERR:%s", strerror(err));
    else
        for (long i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
}

static void rd(const char *key, int fd) {
    unsigned char b[16];
    ssize_t n = read(fd, b, sizeof b);
    hex(key, b, n, errno);
}

static void prd(const char *key, int fd, off_t off) {
    unsigned char b[16];
    ssize_t n = pread(fd, b, sizeof b, off);
    hex(key, b, n, errno);
}

/* prd on every CPU this process may run on, one after another: the library
 * reads an image through one open file of its own per CPU. Prints the first
 * CPU's bytes, or ERR if a read on any CPU failed or read other bytes. */
static void prd_cpus(const char *key, int fd, off_t off) {
    cpu_set_t all, one;
    unsigned char first[16] = {0};
    int reads = 0, err = ENOENT; /* ENOENT: no CPU could be pinned */
    if (sched_getaffinity(0, sizeof all, &all) != 0) {
        prd(key, fd, off);
        return;
    }
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, &all)) continue;
        CPU_ZERO(&one);
        CPU_SET(c, &one);
        if (sched_setaffinity(0, sizeof one, &one) != 0) continue;
        unsigned char b[16];
        ssize_t n = pread(fd, b, sizeof b, off);
        if (n != (ssize_t)sizeof b) {
            err = n < 0 ? errno : EIO;
            reads = -1;
            break;
        }
        if (reads > 0 && memcmp(first, b, sizeof b) != 0) {
            err = EILSEQ;
            reads = -1;
            break;
        }
        memcpy(first, b, sizeof b);
        reads++;
    }
    sched_setaffinity(0, sizeof all, &all);
    hex(key, first, reads > 0 ? (ssize_t)sizeof first : -1, err);
}

/* Opens `path` until the kernel hands out number `want` (libc may have
 * closed `want` behind the library's back); the extra fds stay open. */
static int open_at_number(const char *path, int want) {
    for (int i = 0; i < 64; i++) {
        int fd = open(path, O_RDONLY);
        if (fd == want || fd < 0) return fd;
    }
    return -1;
}

static int must_open(const char *path, int flags) {
    int fd = open(path, flags);
    if (fd < 0) {
        printf("open_failed=%s:%s\n", path, strerror(errno));
        exit(2);
    }
    return fd;
}

/* A child shell reads 16 bytes from the inherited fd, or says it has none. */
static void child(int fd, const char *key) {
    char cmd[512];
    snprintf(cmd, sizeof cmd,
             "if [ -e /proc/self/fd/%d ]; then head -c 16 <&%d | od -An -v -tx1 | tr -d ' \\n'; else printf closed; fi",
             fd, fd);
    printf("%s=", key);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    int st;
    waitpid(pid, &st, 0);
    printf("\n");
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: fdcheck IMAGE PLAIN OFF WOFF\n");
        return 2;
    }
    const char *img = argv[1], *plain = argv[2];
    off_t off = atoll(argv[3]), woff = atoll(argv[4]);
    setvbuf(stdout, NULL, _IONBF, 0);
    unsigned char b[16];
    int fd, fd2;
    size_t n;
    FILE *f;

    /* open returns the lowest free number (POSIX), for an image too. */
    int low = must_open("/dev/null", O_RDONLY);
    close(low);
    fd = must_open(img, O_RDONLY);
    printf("open_lowest=%d\n", fd == low);
    close(fd);

    /* fdopen + fclose: libc closes the image fd internally. */
    fd = must_open(img, O_RDONLY);
    f = fdopen(fd, "r");
    n = fread(b, 1, 16, f);
    hex("fdopen_img", b, (long)n, errno);
    fclose(f);
    fd2 = open_at_number(plain, fd);
    printf("fdopen_reused=%d\n", fd2 == fd);
    rd("fdopen_reuse", fd2);
    close(fd2);

    /* fopen + fclose. */
    f = fopen(img, "rb");
    if (!f) {
        printf("fopen_failed=%s\n", strerror(errno));
        return 2;
    }
    fd = fileno(f);
    n = fread(b, 1, 16, f);
    hex("fopen_img", b, (long)n, errno);
    fclose(f);
    fd2 = open_at_number(plain, fd);
    printf("fopen_reused=%d\n", fd2 == fd);
    rd("fopen_reuse", fd2);
    close(fd2);

    /* closefrom / close_range on the image fd itself. */
    fd = must_open(img, O_RDONLY);
    rd("closefrom_img", fd);
    closefrom(fd);
    fd2 = open_at_number(plain, fd);
    printf("closefrom_reused=%d\n", fd2 == fd);
    rd("closefrom_reuse", fd2);
    close(fd2);

    fd = must_open(img, O_RDONLY);
    rd("close_range_img", fd);
    close_range(fd, ~0U, 0);
    fd2 = open_at_number(plain, fd);
    printf("close_range_reused=%d\n", fd2 == fd);
    rd("close_range_reuse", fd2);
    close(fd2);

    /* A raw close syscall (no hook sees it) and the number reused by a
     * regular file: every call on it must reach the file. */
    fd = must_open(img, O_RDONLY);
    rd("raw_close_img", fd);
    syscall(SYS_close, fd);
    fd2 = open_at_number(plain, fd);
    printf("raw_close_reused=%d\n", fd2 == fd);
    prd("raw_close_reuse_pread", fd2, 0);
    rd("raw_close_reuse", fd2);
    struct stat st;
    printf("raw_close_fstat_reg=%d\n", fstat(fd2, &st) == 0 && S_ISREG(st.st_mode));
    close(fd2);

    /* A raw dup3 of a pipe onto an image fd: writes go to the pipe (a
     * non-blocking one: a write lost into the image shows as EAGAIN). */
    fd = must_open(img, O_RDWR);
    int pipefd[2];
    if (pipe2(pipefd, O_NONBLOCK) != 0) return 2;
    syscall(SYS_dup3, pipefd[1], fd, 0);
    printf("raw_dup3_write=%ld\n", (long)write(fd, "PIPE-WRITE-BYTES", 16));
    rd("raw_dup3_pipe", pipefd[0]);
    close(fd);
    close(pipefd[0]);
    close(pipefd[1]);

    /* The library's own fds survive the program closing everything above. */
    fd = must_open(img, O_RDWR);
    closefrom(fd + 1);
    prd_cpus("survive_closefrom", fd, off);
    close_range(fd + 1, ~0U, 0);
    prd_cpus("survive_close_range", fd, off);
    for (int i = fd + 1; i < 1024; i++) close(i);
    prd_cpus("survive_close_loop", fd, off);
    /* dup2 of another file onto every number above (the library's fds
     * among them: they move away first), then closed again. */
    int other = must_open(plain, O_RDONLY);
    for (int i = fd + 1; i < 1024; i++)
        if (i != other) dup2(other, i);
    prd_cpus("survive_dup2_over", fd, off);
    for (int i = fd + 1; i < 1024; i++) close(i);
    if (other < fd) close(other);
    prd_cpus("survive_dup2_closed", fd, off);
    printf("survive_write=%ld\n", (long)pwrite(fd, "SURVIVOR-WRITE!!", 16, woff));
    printf("survive_fsync=%d\n", fsync(fd));
    close(fd);

    /* dup shares the offset; SEEK_END is the virtual size. */
    fd = must_open(img, O_RDONLY);
    int d = dup(fd);
    rd("dup_a", fd);
    rd("dup_b", d);
    printf("dup_end=%lld\n", (long long)lseek(d, 0, SEEK_END));
    close(d);
    close(fd);

    /* F_GETFL reports the caller's access mode (e2fsprogs relies on it). */
    fd = must_open(img, O_RDONLY);
    printf("getfl_ro=%d\n", fcntl(fd, F_GETFL) & O_ACCMODE);
    close(fd);
    fd = must_open(img, O_RDWR);
    printf("getfl_rw=%d\n", fcntl(fd, F_GETFL) & O_ACCMODE);
    close(fd);

    /* mmap of an image fd maps the disk's bytes (a copy), not the empty
     * dummy, and outlives the fd. */
    fd = must_open(img, O_RDONLY);
    unsigned char *p = mmap(NULL, 8192, PROT_READ, MAP_SHARED, fd, 4096);
    close(fd);
    if (p == MAP_FAILED)
        hex("mmap", p, -1, errno);
    else {
        hex("mmap", p, 16, 0);
        munmap(p, 8192);
    }

    /* O_CLOEXEC, and inheritance with the offset. */
    fd = must_open(img, O_RDONLY | O_CLOEXEC);
    printf("cloexec_flag=%d\n", (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
    child(fd, "cloexec_child");
    close(fd);
    fd = must_open(img, O_RDONLY);
    lseek(fd, 4096, SEEK_SET);
    child(fd, "inherit_child");
    printf("inherit_offset_after=%lld\n", (long long)lseek(fd, 0, SEEK_CUR));
    close(fd);
    printf("done=1\n");
    return 0;
}
