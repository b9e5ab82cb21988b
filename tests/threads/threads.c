/* Threads, dup'ed fds, signals and fork on one image under libvhdio.
 *
 * usage: threads IMAGE PLAINFILE EXPECT_OUT [child-writes]
 *
 * 1. Eight threads do pread/pwrite on disjoint regions of the image: threads
 *    0-3 on the fd from open(), 4-7 on a dup() of it. Regions are 1.5 MiB,
 *    so neighbours share format blocks (concurrent allocation of one block).
 *    Each thread keeps a model of its region, checks every read against it,
 *    and preads PLAINFILE (a non-image fd) between image calls, checking its
 *    content. A 1 ms interval timer interrupts them all the time; its
 *    handler does write() and pread() on non-image fds (the fast path must
 *    be async-signal-safe: no lock, no allocation).
 * 2. At the end every thread reads its whole region back; the models are
 *    written to EXPECT_OUT (the disk the image must hold, for qemu-img).
 * 3. Fork while four threads keep doing image I/O: each child (alarm(10))
 *    does an image pread and an image pwrite attempt and exits; the parent
 *    waits; a child killed by the alarm is a deadlock. With child-writes,
 *    the child also tries a pwrite (refused with EBUSY: the parent is the
 *    writer), which must return too.
 *
 * Prints "OK <ops> <forks>" on success, "FAIL ..." and exit 1 otherwise. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#define THREADS 8
#define REGION (3u << 19) /* 1.5 MiB */
#define ITERS 2500
#define PLAIN_LEN 65536

static int img_fd, img_dup, plain_fd, null_fd;
static unsigned char plain[PLAIN_LEN];
static unsigned char *model[THREADS];
static atomic_long ops;
static atomic_int failed;
static atomic_int stop;
static atomic_long signals;
static int child_writes;

static void fail(const char *what, int t, long off, long len) {
    if (!atomic_exchange(&failed, 1))
        printf("FAIL %s thread %d off %ld len %ld errno %d\n", what, t, off, len, errno);
    fflush(stdout);
}

static uint64_t rnd(uint64_t *s) {
    *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

static void on_alarm(int sig) {
    (void)sig;
    int saved = errno;
    char c = 'x', b[16];
    (void)!write(null_fd, &c, 1);
    if (pread(plain_fd, b, sizeof b, 100) != sizeof b || memcmp(b, plain + 100, sizeof b) != 0)
        atomic_store(&failed, 2);
    atomic_fetch_add(&signals, 1);
    errno = saved;
}

static void check_plain(int t, uint64_t *s) {
    unsigned char b[512];
    long off = rnd(s) % (PLAIN_LEN - 512);
    ssize_t r;
    do r = pread(plain_fd, b, sizeof b, off); while (r < 0 && errno == EINTR);
    if (r != (ssize_t)sizeof b || memcmp(b, plain + off, sizeof b) != 0) fail("plain pread", t, off, 512);
}

static ssize_t full_pread(int fd, void *buf, size_t n, off_t off) {
    ssize_t r;
    do r = pread(fd, buf, n, off); while (r < 0 && errno == EINTR);
    return r;
}
static ssize_t full_pwrite(int fd, const void *buf, size_t n, off_t off) {
    ssize_t r;
    do r = pwrite(fd, buf, n, off); while (r < 0 && errno == EINTR);
    return r;
}

static void *worker(void *arg) {
    int t = (int)(intptr_t)arg;
    int fd = t < THREADS / 2 ? img_fd : img_dup;
    uint64_t s = 0x9E3779B97F4A7C15ULL * (t + 1);
    long base = (long)t * REGION;
    unsigned char *buf = malloc(REGION), *m = model[t];
    for (int i = 0; i < ITERS && !atomic_load(&failed); i++) {
        long len = 1 + rnd(&s) % (rnd(&s) % 4 == 0 ? 70000 : 5000);
        long off = rnd(&s) % (REGION - len);
        if (rnd(&s) % 2) off &= ~511L;
        for (long j = 0; j < len; j++) buf[j] = (unsigned char)(t * 37 + i * 11 + j);
        if (full_pwrite(fd, buf, len, base + off) != len) { fail("pwrite", t, off, len); break; }
        memcpy(m + off, buf, len);
        long rl = 1 + rnd(&s) % 20000, ro = rnd(&s) % (REGION - rl);
        if (full_pread(fd, buf, rl, base + ro) != rl || memcmp(buf, m + ro, rl) != 0) { fail("pread", t, ro, rl); break; }
        check_plain(t, &s);
        atomic_fetch_add(&ops, 3);
    }
    if (!atomic_load(&failed)) {
        if (full_pread(fd, buf, REGION, base) != REGION || memcmp(buf, m, REGION) != 0) fail("final pread", t, 0, REGION);
    }
    free(buf);
    return NULL;
}

static void *busy(void *arg) {
    int t = (int)(intptr_t)arg;
    uint64_t s = 12345 + t;
    unsigned char buf[8192];
    long base = (long)t * REGION;
    while (!atomic_load(&stop)) {
        long off = (rnd(&s) % (REGION - sizeof buf)) & ~511L;
        if (rnd(&s) % 2) {
            if (full_pread(img_fd, buf, sizeof buf, base + off) != (ssize_t)sizeof buf) { fail("busy pread", t, off, 8192); break; }
            if (memcmp(buf, model[t] + off, sizeof buf) != 0) { fail("busy compare", t, off, 8192); break; }
        } else {
            memcpy(buf, model[t] + off, sizeof buf); /* rewrite what is there */
            if (full_pwrite(img_dup, buf, sizeof buf, base + off) != (ssize_t)sizeof buf) { fail("busy pwrite", t, off, 8192); break; }
        }
        atomic_fetch_add(&ops, 1);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) { fprintf(stderr, "usage: threads IMAGE PLAIN EXPECT [child-writes]\n"); return 2; }
    child_writes = argc == 5 && strcmp(argv[4], "child-writes") == 0;
    setvbuf(stdout, NULL, _IONBF, 0);
    img_fd = open(argv[1], O_RDWR);
    if (img_fd < 0) { perror("open image"); return 1; }
    img_dup = dup(img_fd);
    plain_fd = open(argv[2], O_RDONLY);
    null_fd = open("/dev/null", O_WRONLY);
    if (plain_fd < 0 || null_fd < 0 || pread(plain_fd, plain, PLAIN_LEN, 0) != PLAIN_LEN) { perror("plain"); return 1; }
    off_t size = lseek(img_fd, 0, SEEK_END);
    if (size < (off_t)THREADS * REGION) { printf("FAIL image too small (%ld)\n", (long)size); return 1; }
    for (int t = 0; t < THREADS; t++) {
        model[t] = malloc(REGION);
        if (full_pread(img_fd, model[t], REGION, (long)t * REGION) != REGION) { printf("FAIL initial read\n"); return 1; }
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 1000}, {0, 1000}};
    setitimer(ITIMER_REAL, &it, NULL);

    pthread_t th[THREADS];
    for (int t = 0; t < THREADS; t++) pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t);
    for (int t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    if (atomic_load(&failed)) { if (atomic_load(&failed) == 2) printf("FAIL signal handler read\n"); return 1; }

    /* Fork while other threads do image I/O. */
    signal(SIGALRM, SIG_DFL);
    for (int t = 0; t < 4; t++) pthread_create(&th[t], NULL, busy, (void *)(intptr_t)t);
    int forks = 0;
    for (int k = 0; k < 60 && !atomic_load(&failed); k++) {
        pid_t pid = fork();
        if (pid == 0) {
            alarm(10);
            unsigned char b[4096];
            long off = (long)(k % THREADS) * REGION + 8192;
            if (full_pread(img_fd, b, sizeof b, off) != (ssize_t)sizeof b) _exit(3);
            /* The parent holds the image for writing: the child is refused or
             * writes; either way it must return. Rewrite what is there. */
            if (child_writes) (void)full_pwrite(img_fd, b, sizeof b, off);
            _exit(memcmp(b, model[k % THREADS] + 8192, sizeof b) == 0 ? 0 : 4);
        }
        int st;
        if (waitpid(pid, &st, 0) != pid) { fail("waitpid", -1, k, 0); break; }
        if (WIFSIGNALED(st)) { printf("FAIL fork child %d killed by signal %d (deadlock)\n", k, WTERMSIG(st)); atomic_store(&failed, 1); break; }
        if (WEXITSTATUS(st) != 0) { printf("FAIL fork child %d exit %d\n", k, WEXITSTATUS(st)); atomic_store(&failed, 1); break; }
        forks++;
        usleep(2000);
    }
    atomic_store(&stop, 1);
    for (int t = 0; t < 4; t++) pthread_join(th[t], NULL);
    if (atomic_load(&failed)) return 1;
    if (fsync(img_fd) != 0) { printf("FAIL fsync errno %d\n", errno); return 1; }

    FILE *f = fopen(argv[3], "wb");
    for (int t = 0; t < THREADS; t++) fwrite(model[t], 1, REGION, f);
    fclose(f);
    printf("OK %ld %d %ld\n", (long)atomic_load(&ops), forks, (long)atomic_load(&signals));
    return 0;
}
