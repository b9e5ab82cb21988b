/* liburing under the library: every ring setup function returns -ENOSYS
 * (liburing's convention: -errno), or with LIBVHD_IO_URING=allow sets up a
 * real ring that reads a regular file. Prints "ok" or the first failure.
 *
 * usage: liburing_check refused|allowed REGULAR_FILE */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHECK(c)                                                             \
    do {                                                                     \
        if (!(c)) {                                                          \
            printf("line %d: %s\n", __LINE__, #c);                           \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

/* Reads the first bytes of `path` through `ring`. */
static void read_through(struct io_uring *ring, const char *path) {
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    char buf[8] = {0};
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    CHECK(sqe != NULL);
    io_uring_prep_read(sqe, fd, buf, 5, 0);
    CHECK(io_uring_submit(ring) == 1);
    struct io_uring_cqe *cqe;
    CHECK(io_uring_wait_cqe(ring, &cqe) == 0);
    CHECK(cqe->res == 5);
    io_uring_cqe_seen(ring, cqe);
    CHECK(memcmp(buf, "uring", 5) == 0);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s refused|allowed REGULAR_FILE\n", argv[0]);
        return 2;
    }
    int allowed = strcmp(argv[1], "allowed") == 0;
    struct io_uring ring;
    struct io_uring_params p;

    int r = io_uring_queue_init(4, &ring, 0);
    if (allowed) {
        CHECK(r == 0);
        read_through(&ring, argv[2]);
        io_uring_queue_exit(&ring);
    } else {
        CHECK(r == -ENOSYS);
    }

    memset(&p, 0, sizeof p);
    r = io_uring_queue_init_params(4, &ring, &p);
    if (allowed) {
        CHECK(r == 0);
        read_through(&ring, argv[2]);
        io_uring_queue_exit(&ring);
    } else {
        CHECK(r == -ENOSYS);
    }

    memset(&p, 0, sizeof p);
    r = io_uring_setup(4, &p);
    if (allowed) {
        CHECK(r >= 0);
        close(r);
    } else {
        CHECK(r == -ENOSYS);
    }
    puts("ok");
    return 0;
}
