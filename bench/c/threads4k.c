/* Random 4 KiB preads from THREADS threads: thread i reads PATH[i % n]; one
 * path means one fd shared by every thread (the fd-table slot and the open
 * file are contended), several paths mean an fd and an image per thread.
 *
 * usage: threads4k THREADS OPS_PER_THREAD SIZE PATH [PATH...]
 * (env THREADS4K_BS: bytes per read instead of 4096; 1 shows the per-call cost)
 * prints: <ops/s of all threads> <ops per CPU second (user+sys)> */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static long ops;
static uint64_t blocks;
static int fds[64];
static int nfds;
static size_t bs = 4096;

static void *worker(void *arg) {
    long t = (long)arg;
    int fd = fds[t % nfds];
    char buf[4096];
    uint64_t x = 0x9E3779B97F4A7C15ull * (uint64_t)(t + 1);
    for (long i = 0; i < ops; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        if (pread(fd, buf, bs, (off_t)(x % blocks) * 4096) != (ssize_t)bs) {
            perror("pread");
            exit(1);
        }
    }
    return NULL;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: threads4k THREADS OPS SIZE PATH...\n"); return 2; }
    int threads = atoi(argv[1]);
    if (getenv("THREADS4K_BS")) bs = strtoul(getenv("THREADS4K_BS"), 0, 10);
    if (bs < 1 || bs > 4096) return 2;
    ops = atol(argv[2]);
    blocks = strtoull(argv[3], 0, 10) / 4096;
    nfds = argc - 4;
    if (threads < 1 || threads > 64 || nfds > 64) return 2;
    for (int i = 0; i < nfds; i++)
        if ((fds[i] = open(argv[4 + i], O_RDONLY)) < 0) { perror(argv[4 + i]); return 1; }
    pthread_t th[64];
    struct timespec a, b;
    double c0 = cpu_s();
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long t = 0; t < threads; t++) pthread_create(&th[t], NULL, worker, (void *)t);
    for (int t = 0; t < threads; t++) pthread_join(th[t], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double wall = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9, cpu = cpu_s() - c0;
    double total = (double)ops * threads;
    printf("%.0f %.0f\n", total / wall, total / cpu);
    return 0;
}
