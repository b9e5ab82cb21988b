/* Raw syscall() under the library: io_uring_setup is refused with ENOSYS
 * (or, with LIBVHD_IO_URING=allow, set up by the kernel); every other
 * number reaches the kernel with its six arguments, and the kernel's return
 * value and errno come back unchanged. Prints "ok" or the first failure.
 *
 * usage: syscall_check refused|allowed SCRATCH_FILE */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define CHECK(c)                                                             \
    do {                                                                     \
        if (!(c)) {                                                          \
            printf("line %d: %s (errno %d: %s)\n", __LINE__, #c, errno,      \
                   strerror(errno));                                         \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

static void check_setup(int allowed) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    errno = 0;
    long r = syscall(__NR_io_uring_setup, 4, &p);
    if (allowed) {
        CHECK(r >= 0);
        CHECK(p.sq_entries >= 4);
        CHECK(close((int)r) == 0);
    } else {
        CHECK(r == -1);
        CHECK(errno == ENOSYS);
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s refused|allowed SCRATCH_FILE\n", argv[0]);
        return 2;
    }
    int allowed = strcmp(argv[1], "allowed") == 0;
    /* Twice: the log line is written once. */
    check_setup(allowed);
    check_setup(allowed);

    /* No arguments; errno untouched on success. */
    errno = 1234;
    CHECK(syscall(SYS_getpid) == getpid());
    CHECK(errno == 1234);

    /* A number the kernel does not know: its ENOSYS. */
    errno = 0;
    CHECK(syscall(100000) == -1 && errno == ENOSYS);

    /* The kernel's errors come back as they are. */
    errno = 0;
    CHECK(syscall(SYS_close, -1) == -1 && errno == EBADF);

    /* Three arguments, a pipe both ways. */
    int fds[2];
    CHECK(pipe(fds) == 0);
    CHECK(syscall(SYS_write, fds[1], "hello", 5) == 5);
    char buf[16] = {0};
    CHECK(syscall(SYS_read, fds[0], buf, sizeof buf) == 5);
    CHECK(memcmp(buf, "hello", 5) == 0);
    errno = 0;
    CHECK(syscall(SYS_lseek, fds[0], 0, SEEK_SET) == -1 && errno == ESPIPE);

    /* Six arguments: mmap's offset (on x86_64 the one passed on the stack)
     * selects the second page of a file. */
    int fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0644);
    CHECK(fd >= 0);
    long page = sysconf(_SC_PAGESIZE);
    char *data = malloc(2 * page);
    memset(data, 'a', page);
    memset(data + page, 'b', page);
    CHECK(write(fd, data, 2 * page) == 2 * page);
    errno = 0;
    CHECK(syscall(SYS_lseek, fd, 0, 99) == -1 && errno == EINVAL);
    char *m = (char *)syscall(SYS_mmap, NULL, page, PROT_READ, MAP_SHARED, fd,
                              page);
    CHECK(m != MAP_FAILED);
    CHECK(m[0] == 'b' && m[page - 1] == 'b');
    CHECK(munmap(m, page) == 0);
    /* Five arguments, pwrite64 reading back with pread64. */
    CHECK(syscall(SYS_pwrite64, fd, "xyz", 3, (long)page + 7) == 3);
    CHECK(syscall(SYS_pread64, fd, buf, 4, (long)page + 6) == 4);
    CHECK(memcmp(buf, "bxyz", 4) == 0);
    CHECK(close(fd) == 0);
    puts("ok");
    return 0;
}
