/* Lookups of image fds racing with open, close and dup under libvhdio.
 *
 * usage: fdrace IMG0 IMG1 IMG2 PLAIN
 *
 * Every 4 KiB block b of source k (the three images and the plain file, k = 3)
 * holds 512 words (k << 40 | b << 9 | w). Two mutator threads own 4 slots
 * each; a slot publishes (fd, k) with a generation and a busy bit (a seqlock).
 * A mutator changes a slot by: close + open of another source; dup or
 * F_DUPFD_CLOEXEC to a new number + close of the old; dup2 of another of its
 * slots' fds over it; or a raw close syscall behind the library's back + open
 * of the plain file (the table keeps a stale entry until the number is
 * checked or reused). Four reader threads pread random blocks of random
 * slots. A read during which the slot did not change (same word before and
 * after, not busy) must return exactly source k's block: no lost mapping
 * (EBADF, the empty dummy's 0 bytes) and no stale one (another source's
 * bytes). A read racing with a change may fail with EBADF or return
 * anything: by then the number may even be the library's own container fd,
 * as it could be another file without the library.
 * First: dup2(fd, fd) keeps the mapping.
 *
 * Prints "OK <stable reads> <racing reads> <changes>" or "FAIL ...". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BLOCKS 2048 /* 8 MiB sources */
#define MUTATORS 2
#define OWN 4
#define READERS 4
#define CHANGES 3000

static const char *paths[4];
static _Atomic uint64_t slots[MUTATORS * OWN]; /* gen << 32 | fd << 8 | k << 1 | busy */
static atomic_int done, failed;
static atomic_long stable, racing, changes;

static void fail(const char *fmt, ...) {
    if (!atomic_exchange(&failed, 1)) {
        va_list ap;
        va_start(ap, fmt);
        printf("FAIL ");
        vprintf(fmt, ap);
        printf("\n");
        va_end(ap);
    }
}

static uint64_t rnd(uint64_t *s) {
    *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

/* The source whose block b `buf` is, or -1 if it is none. */
static int source_of(const uint64_t *buf, long b) {
    int k = (int)(buf[0] >> 40);
    if (k < 0 || k > 3) return -1;
    for (int w = 0; w < 512; w++)
        if (buf[w] != ((uint64_t)k << 40 | (uint64_t)b << 9 | (uint64_t)w)) return -1;
    return k;
}

static int open_source(int k) {
    int fd = open(paths[k], O_RDONLY);
    if (fd < 0) fail("open source %d errno %d", k, errno);
    return fd;
}

static uint64_t word(uint64_t gen, int fd, int k) { return gen << 32 | (uint64_t)fd << 8 | (uint64_t)k << 1; }

static void *mutator(void *arg) {
    int m = (int)(intptr_t)arg;
    uint64_t s = 0x1234567 + m;
    _Atomic uint64_t *mine = slots + m * OWN;
    for (long i = 0; i < CHANGES && !atomic_load(&failed); i++) {
        int j = rnd(&s) % OWN, other = (j + 1 + rnd(&s) % (OWN - 1)) % OWN;
        uint64_t w = atomic_load(&mine[j]), ow = atomic_load(&mine[other]);
        int fd = (w >> 8) & 0xffffff, k = (w >> 1) & 3, ofd = (ow >> 8) & 0xffffff, ok = (ow >> 1) & 3;
        uint64_t gen = (w >> 32) + 1;
        atomic_store(&mine[j], w | 1);
        int nfd = -1, nk = k;
        switch (rnd(&s) % 5) {
        case 0: case 1: /* close, open another source */
            close(fd);
            nk = rnd(&s) % 3;
            nfd = open_source(nk);
            break;
        case 2: /* move to a new number */
            nfd = rnd(&s) % 2 ? dup(fd) : fcntl(fd, F_DUPFD_CLOEXEC, 0);
            if (nfd < 0) fail("dup %d errno %d", fd, errno);
            close(fd);
            break;
        case 3: /* dup2 another slot's fd over this one */
            if (dup2(ofd, fd) != fd) fail("dup2 %d %d errno %d", ofd, fd, errno);
            nfd = fd;
            nk = ok;
            break;
        case 4: /* closed behind the library's back; the number may come back as a plain file */
            syscall(SYS_close, fd);
            nk = 3;
            nfd = open_source(3);
            break;
        }
        if (nfd < 0) break;
        atomic_store(&mine[j], word(gen, nfd, nk));
        atomic_fetch_add(&changes, 1);
    }
    return NULL;
}

static void *reader(void *arg) {
    uint64_t s = 0xabcdef + (intptr_t)arg;
    uint64_t buf[512];
    while (!atomic_load(&done) && !atomic_load(&failed)) {
        int j = rnd(&s) % (MUTATORS * OWN);
        long b = rnd(&s) % BLOCKS;
        uint64_t w1 = atomic_load(&slots[j]);
        int fd = (w1 >> 8) & 0xffffff, k = (w1 >> 1) & 3;
        ssize_t r = pread(fd, buf, sizeof buf, b * 4096);
        int e = errno;
        uint64_t w2 = atomic_load(&slots[j]);
            if (w1 == w2 && !(w1 & 1)) {
            atomic_fetch_add(&stable, 1);
            if (r != (ssize_t)sizeof buf) { fail("stable pread fd %d returned %ld errno %d (lost mapping)", fd, (long)r, e); break; }
            int got = source_of(buf, b);
            if (got != k) { fail("stable pread fd %d: source %d's block, want %d (stale mapping)", fd, got, k); break; }
        } else {
            atomic_fetch_add(&racing, 1);
            if (r < 0 && e != EBADF) { fail("racing pread fd %d: errno %d", fd, e); break; }
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: fdrace IMG0 IMG1 IMG2 PLAIN\n"); return 2; }
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int k = 0; k < 4; k++) paths[k] = argv[1 + k];
    uint64_t buf[512];

    int fd = open_source(1);
    if (fd < 0) return 1;
    if (dup2(fd, fd) != fd || pread(fd, buf, sizeof buf, 4096 * 7) != sizeof buf || source_of(buf, 7) != 1) {
        printf("FAIL dup2(fd, fd) lost the mapping of an image fd\n");
        return 1;
    }
    close(fd);

    for (int j = 0; j < MUTATORS * OWN; j++) {
        int k = j % 3, f = open_source(k);
        if (f < 0) return 1;
        atomic_store(&slots[j], word(0, f, k));
    }
    pthread_t mt[MUTATORS], rt[READERS];
    for (long i = 0; i < READERS; i++) pthread_create(&rt[i], NULL, reader, (void *)i);
    for (long i = 0; i < MUTATORS; i++) pthread_create(&mt[i], NULL, mutator, (void *)i);
    for (int i = 0; i < MUTATORS; i++) pthread_join(mt[i], NULL);
    atomic_store(&done, 1);
    for (int i = 0; i < READERS; i++) pthread_join(rt[i], NULL);
    if (atomic_load(&failed)) return 1;
    /* Every published fd still reads its source. */
    for (int j = 0; j < MUTATORS * OWN; j++) {
        uint64_t w = atomic_load(&slots[j]);
        int f = (w >> 8) & 0xffffff, k = (w >> 1) & 3;
        for (long b = 0; b < BLOCKS; b += 97)
            if (pread(f, buf, sizeof buf, b * 4096) != sizeof buf || source_of(buf, b) != k) {
                printf("FAIL final pread fd %d block %ld: want source %d\n", f, b, k);
                return 1;
            }
    }
    printf("OK %ld %ld %ld\n", (long)atomic_load(&stable), (long)atomic_load(&racing), (long)atomic_load(&changes));
    return 0;
}
