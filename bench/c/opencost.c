/* Time of one open() of PATH in a fresh process (after the library, if preloaded,
 * has initialised on an unrelated open): prints wall ns, the size the fd reports
 * (BLKGETSIZE64 for a block device, st_size otherwise), then CPU ns. */
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: opencost PATH\n"); return 2; }
    int w = open("/dev/null", O_RDONLY);
    close(w);
    struct timespec a, b, ca, cb;
    clock_gettime(CLOCK_MONOTONIC, &a);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ca);
    int fd = open(argv[1], O_RDONLY);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cb);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (fd < 0) { perror(argv[1]); return 1; }
    struct stat st;
    uint64_t size = 0;
    fstat(fd, &st);
    if (S_ISBLK(st.st_mode)) ioctl(fd, BLKGETSIZE64, &size); else size = st.st_size;
    close(fd);
    printf("%ld %llu %ld\n", (long)((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec)), (unsigned long long)size,
           (long)((cb.tv_sec - ca.tv_sec) * 1000000000L + (cb.tv_nsec - ca.tv_nsec)));
    return 0;
}
