/* Fallback when fio is missing: N random 4 KiB preads or pwrites over SIZE
 * bytes of PATH from OFFSET (default 0; 4 KiB-aligned plus OFFSET); prints
 * wall and CPU ns per operation. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) { fprintf(stderr, "usage: rand4k read|write PATH SIZE N [OFFSET]\n"); return 2; }
    off_t base = argc == 6 ? (off_t)strtoull(argv[5], 0, 10) : 0;
    int wr = strcmp(argv[1], "write") == 0;
    uint64_t blocks = strtoull(argv[3], 0, 10) / 4096;
    long n = atol(argv[4]);
    int fd = open(argv[2], wr ? O_RDWR : O_RDONLY);
    if (fd < 0) { perror(argv[2]); return 1; }
    static char buf[4096];
    memset(buf, 0xa5, sizeof buf);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    struct timespec a, b, ca, cb;
    clock_gettime(CLOCK_MONOTONIC, &a);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ca);
    for (long i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        off_t off = base + (off_t)(x % blocks) * 4096;
        ssize_t r = wr ? pwrite(fd, buf, 4096, off) : pread(fd, buf, 4096, off);
        if (r != 4096) { perror("io"); return 1; }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cb);
    close(fd);
    printf("%.1f %.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n,
           ((cb.tv_sec - ca.tv_sec) * 1e9 + (cb.tv_nsec - ca.tv_nsec)) / n);
    return 0;
}
