/* open + read + close of one small file in a loop: prints ns per iteration.
 * Prints wall and CPU ns per iteration.
 * Used to measure the per-call cost the library adds on files that are not images. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: orc FILE N\n"); return 2; }
    long n = atol(argv[2]);
    char buf[256];
    struct timespec a, b, ca, cb;
    for (int i = 0; i < 1000; i++) { int fd = open(argv[1], O_RDONLY); if (fd < 0) { perror(argv[1]); return 1; } if (read(fd, buf, sizeof buf) < 0) return 1; close(fd); }
    clock_gettime(CLOCK_MONOTONIC, &a);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ca);
    for (long i = 0; i < n; i++) {
        int fd = open(argv[1], O_RDONLY);
        if (fd < 0) { perror(argv[1]); return 1; }
        if (read(fd, buf, sizeof buf) < 0) { perror("read"); return 1; }
        close(fd);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cb);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    double cpu = (cb.tv_sec - ca.tv_sec) * 1e9 + (cb.tv_nsec - ca.tv_nsec);
    printf("%.1f %.1f\n", ns / n, cpu / n);
    return 0;
}
