/* Asynchronous I/O on an image fd beside a regular file, under libvhdio.so
 * (tests/aio.rs). Usage: aio_check IMAGE REGULAR_FILE. Exits 0 and prints
 * "ok" if every check holds; otherwise prints the failed check.
 *
 * Leaves on the disk: 'A' x 64K at 0, 'C' x 4K at 1M, 'E' x 4K + 'e' x 4K
 * at 2M (pwritev), 'P' x 8K at 3M (aio_write), 'L' x 16K at 4M (lio_listio),
 * 'T' x 4K at 5M (cross-thread wake), 'X' x 4K at 6M (cancel). */
#define _GNU_SOURCE
#include <aio.h>
#include <errno.h>
#include <fcntl.h>
#include <libaio.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Built with -DVIA_DLSYM and without -laio: the libaio functions are the
 * library's own, found with dlsym, as for a program that never loads libaio. */
#ifdef VIA_DLSYM
#include <dlfcn.h>
static int (*p_io_setup)(int, io_context_t *);
static int (*p_io_destroy)(io_context_t);
static int (*p_io_submit)(io_context_t, long, struct iocb **);
static int (*p_io_cancel)(io_context_t, struct iocb *, struct io_event *);
static int (*p_io_getevents)(io_context_t, long, long, struct io_event *, struct timespec *);
static int (*p_io_pgetevents)(io_context_t, long, long, struct io_event *, struct timespec *,
                              sigset_t *);
#define io_setup p_io_setup
#define io_destroy p_io_destroy
#define io_submit p_io_submit
#define io_cancel p_io_cancel
#define io_getevents p_io_getevents
#define io_pgetevents p_io_pgetevents
#define RESOLVE(f)                                                             \
    do {                                                                       \
        *(void **)&p_##f = dlsym(RTLD_DEFAULT, #f);                            \
        if (!p_##f) {                                                          \
            fprintf(stderr, "no %s\n", #f);                                    \
            exit(1);                                                           \
        }                                                                      \
    } while (0)
static void resolve(void) {
    RESOLVE(io_setup);
    RESOLVE(io_destroy);
    RESOLVE(io_submit);
    RESOLVE(io_cancel);
    RESOLVE(io_getevents);
    RESOLVE(io_pgetevents);
}
#else
static void resolve(void) {}
#endif

#define CHECK(c)                                                               \
    do {                                                                       \
        if (!(c)) {                                                            \
            fprintf(stderr, "line %d: %s failed (errno %d)\n", __LINE__, #c,   \
                    errno);                                                    \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

#define K 1024L
#define M (1024L * 1024L)

static char *buf(char c, size_t n) {
    char *b;
    CHECK(posix_memalign((void **)&b, 4096, n) == 0);
    memset(b, c, n);
    return b;
}

static int all(const char *b, char c, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (b[i] != c)
            return 0;
    return 1;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* ---------------------------------------------------------------- libaio */

static io_context_t wake_ctx;
static int waited;

static void *waiter(void *arg) {
    (void)arg;
    struct io_event ev;
    struct timespec ts = {5, 0};
    waited = io_getevents(wake_ctx, 1, 1, &ev, &ts);
    return NULL;
}

static void libaio_checks(int img, int reg, int img_ro) {
    io_context_t ctx = 0;
    CHECK(io_setup(64, &ctx) == 0);

    /* A mixed batch: image and regular-file iocbs interleaved. */
    struct iocb cb[7], *list[7];
    char *a = buf('A', 64 * K), *b = buf('B', 4 * K), *c = buf('C', 4 * K);
    char *e1 = buf('E', 4 * K), *e2 = buf('e', 4 * K), *r2 = buf('R', 8 * K);
    struct iovec ev_iov[2] = {{e1, 4 * K}, {e2, 4 * K}};
    struct iovec reg_iov[2] = {{r2, 4 * K}, {r2 + 4 * K, 4 * K}};
    io_prep_pwrite(&cb[0], img, a, 64 * K, 0);
    io_prep_pwrite(&cb[1], reg, b, 4 * K, 0);
    io_prep_pwrite(&cb[2], img, c, 4 * K, 1 * M);
    io_prep_pwritev(&cb[3], reg, reg_iov, 2, 64 * K);
    io_prep_pwritev(&cb[4], img, ev_iov, 2, 2 * M);
    io_prep_fsync(&cb[5], img);
    io_prep_fdsync(&cb[6], reg);
    int efd = eventfd(0, 0);
    CHECK(efd >= 0);
    io_set_eventfd(&cb[2], efd);
    long want[7] = {64 * K, 4 * K, 4 * K, 8 * K, 8 * K, 0, 0};
    for (int i = 0; i < 7; i++) {
        cb[i].data = (void *)(uintptr_t)(100 + i);
        list[i] = &cb[i];
    }
    CHECK(io_submit(ctx, 7, list) == 7);
    /* The library hands image iocbs to the kernel in disguise: restored. */
    CHECK(cb[0].aio_fildes == img && cb[0].aio_lio_opcode == IO_CMD_PWRITE);
    CHECK(cb[0].u.c.nbytes == 64 * K && cb[0].u.c.offset == 0);
    CHECK(cb[4].aio_fildes == img && cb[4].aio_lio_opcode == IO_CMD_PWRITEV);
    CHECK(cb[4].u.c.nbytes == 2 && cb[4].u.c.offset == 2 * M);
    CHECK(cb[5].aio_fildes == img && cb[5].aio_lio_opcode == IO_CMD_FSYNC);
    struct io_event ev[16];
    int got = 0, seen[7] = {0}, order[7], image_pos = -1;
    while (got < 7) {
        int n = io_getevents(ctx, 1, 16 - got, ev + got, NULL);
        CHECK(n > 0);
        got += n;
    }
    /* Nothing more: a zero-timeout poll returns 0. */
    struct timespec zero = {0, 0};
    CHECK(io_getevents(ctx, 0, 16, ev + got, &zero) == 0);
    for (int k = 0; k < 7; k++) {
        int i = (int)((struct iocb *)ev[k].obj - cb);
        CHECK(i >= 0 && i < 7 && !seen[i]);
        seen[i] = 1;
        order[k] = i;
        CHECK((uintptr_t)ev[k].data == (uintptr_t)(100 + i));
        CHECK((long)ev[k].res == want[i]);
        CHECK(ev[k].res2 == 0);
    }
    /* Image completions come in submission order. */
    for (int k = 0; k < 7; k++) {
        int i = order[k];
        if (i == 0 || i == 2 || i == 4 || i == 5) {
            CHECK(i > image_pos);
            image_pos = i;
        }
    }
    uint64_t one = 0;
    CHECK(read(efd, &one, 8) == 8 && one == 1);

    /* Read back through libaio, again mixed. */
    char *ra = buf(0, 64 * K), *rb = buf(0, 4 * K), *rv = buf(0, 8 * K);
    struct iovec rv_iov[2] = {{rv, 4 * K}, {rv + 4 * K, 4 * K}};
    io_prep_pread(&cb[0], img, ra, 64 * K, 0);
    io_prep_pread(&cb[1], reg, rb, 4 * K, 0);
    io_prep_preadv(&cb[2], img, rv_iov, 2, 2 * M);
    CHECK(io_submit(ctx, 3, list) == 3);
    got = 0;
    while (got < 3) {
        int n = io_getevents(ctx, 3 - got, 3 - got, ev + got, NULL);
        CHECK(n > 0);
        got += n;
    }
    for (int k = 0; k < 3; k++)
        CHECK(ev[k].res == (ev[k].obj == &cb[0] ? 64 * K : ev[k].obj == &cb[1] ? 4 * K : 8 * K));
    CHECK(all(ra, 'A', 64 * K) && all(rb, 'B', 4 * K));
    CHECK(all(rv, 'E', 4 * K) && all(rv + 4 * K, 'e', 4 * K));

    /* Results: past the end reads 0 bytes and writes ENOSPC (block device). */
    off_t size = lseek(img, 0, SEEK_END);
    CHECK(size > 0);
    io_prep_pread(&cb[0], img, ra, 4 * K, size);
    io_prep_pwrite(&cb[1], img, a, 4 * K, size);
    CHECK(io_submit(ctx, 2, list) == 2);
    CHECK(io_getevents(ctx, 2, 2, ev, NULL) == 2);
    /* (an error comes from the library's queue, before the ring's events) */
    int at0 = ev[0].obj == &cb[0] ? 0 : 1;
    CHECK(ev[at0].obj == &cb[0] && ev[at0].res == 0);
    CHECK(ev[1 - at0].obj == &cb[1] && (long)ev[1 - at0].res == -ENOSPC);
    CHECK(ev[0].res2 == 0 && ev[1].res2 == 0);
    /* The same through io_pgetevents, with a signal mask. */
    sigset_t mask;
    sigemptyset(&mask);
    CHECK(io_submit(ctx, 2, list) == 2);
    got = 0;
    while (got < 2) {
        int n = io_pgetevents(ctx, 1, 2 - got, ev + got, NULL, &mask);
        CHECK(n > 0);
        got += n;
    }
    at0 = ev[0].obj == &cb[0] ? 0 : 1;
    CHECK(ev[at0].obj == &cb[0] && ev[at0].res == 0);
    CHECK(ev[1 - at0].obj == &cb[1] && (long)ev[1 - at0].res == -ENOSPC);
    /* Submit checks: a write on a read-only fd, a negative offset. */
    io_prep_pwrite(&cb[0], img_ro, a, 4 * K, 0);
    CHECK(io_submit(ctx, 1, list) == -EBADF);
    io_prep_pread(&cb[0], img, ra, 4 * K, -4096);
    CHECK(io_submit(ctx, 1, list) == -EINVAL);
    /* A regular iocb before a failing image one is still submitted. */
    io_prep_pread(&cb[0], reg, rb, 4 * K, 0);
    io_prep_pwrite(&cb[1], img_ro, a, 4 * K, 0);
    CHECK(io_submit(ctx, 2, list) == 1);
    CHECK(io_getevents(ctx, 1, 1, ev, NULL) == 1 && ev[0].obj == &cb[0]);

    /* Timeout with nothing in flight: 0 after about the timeout. */
    struct timespec ts = {0, 50 * 1000 * 1000};
    double t0 = now();
    CHECK(io_getevents(ctx, 1, 1, ev, &ts) == 0);
    CHECK(now() - t0 >= 0.04);

    /* A thread blocked in io_getevents wakes for another thread's image iocb,
     * on a new context that has not seen one before. */
    CHECK(io_setup(8, &wake_ctx) == 0);
    pthread_t th;
    CHECK(pthread_create(&th, NULL, waiter, NULL) == 0);
    usleep(200 * 1000);
    char *t = buf('T', 4 * K);
    io_prep_pwrite(&cb[0], img, t, 4 * K, 5 * M);
    t0 = now();
    CHECK(io_submit(wake_ctx, 1, list) == 1);
    pthread_join(th, NULL);
    CHECK(waited == 1 && now() - t0 < 2.0);
    CHECK(io_destroy(wake_ctx) == 0);

    /* io_cancel: an image iocb is already done (EINVAL); its event stays. */
    char *x = buf('X', 4 * K);
    io_prep_pwrite(&cb[0], img, x, 4 * K, 6 * M);
    CHECK(io_submit(ctx, 1, list) == 1);
    CHECK(io_cancel(ctx, &cb[0], &ev[0]) == -EINVAL);
    CHECK(io_getevents(ctx, 1, 1, ev, NULL) == 1 && ev[0].obj == &cb[0] && ev[0].res == 4 * K);

    /* io_destroy drops unreaped image events; a new context starts empty. */
    io_prep_pwrite(&cb[0], img, x, 4 * K, 6 * M);
    CHECK(io_submit(ctx, 1, list) == 1);
    CHECK(io_destroy(ctx) == 0);
    io_context_t ctx2 = 0;
    CHECK(io_setup(8, &ctx2) == 0);
    CHECK(io_getevents(ctx2, 0, 1, ev, &zero) == 0);
    CHECK(io_destroy(ctx2) == 0);
    close(efd);
}

/* ------------------------------------------------------------ POSIX AIO */

static volatile sig_atomic_t signals, bad_signals;
static void *signal_value;
/* An aiocb whose aio_error the handler reads (async-signal-safe). */
static struct aiocb *signal_cb;
static volatile int handler_error = -1;

static void on_signal(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    if (si->si_code == SI_ASYNCIO && si->si_value.sival_ptr == signal_value)
        signals++;
    else
        bad_signals++;
    if (signal_cb)
        handler_error = aio_error(signal_cb);
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int notified;
static void *notified_value;

static void on_thread(union sigval v) {
    pthread_mutex_lock(&mu);
    notified++;
    notified_value = v.sival_ptr;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
}

static void wait_notified(int n) {
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 5;
    pthread_mutex_lock(&mu);
    while (notified < n)
        CHECK(pthread_cond_timedwait(&cv, &mu, &dl) == 0);
    pthread_mutex_unlock(&mu);
}

static void wait_signals(int n) {
    double t0 = now();
    while (signals < n && now() - t0 < 5)
        usleep(1000);
    CHECK(signals == n && bad_signals == 0);
}

static void posix_checks(int img, int reg, int img_wo) {
    int sig = SIGRTMIN + 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO;
    CHECK(sigaction(sig, &sa, NULL) == 0);

    /* aio_write with SIGEV_SIGNAL. */
    struct aiocb w;
    memset(&w, 0, sizeof w);
    w.aio_fildes = img;
    w.aio_buf = buf('P', 8 * K);
    w.aio_nbytes = 8 * K;
    w.aio_offset = 3 * M;
    w.aio_sigevent.sigev_notify = SIGEV_SIGNAL;
    w.aio_sigevent.sigev_signo = sig;
    w.aio_sigevent.sigev_value.sival_ptr = signal_value = &w;
    signal_cb = &w;
    CHECK(aio_write(&w) == 0);
    wait_signals(1);
    CHECK(handler_error == 0);
    signal_cb = NULL;
    CHECK(aio_error(&w) == 0);
    CHECK(aio_return(&w) == 8 * K);

    /* aio_read with SIGEV_THREAD, aio_suspend on a mixed list. */
    struct aiocb r, q;
    memset(&r, 0, sizeof r);
    r.aio_fildes = img;
    r.aio_buf = buf(0, 8 * K);
    r.aio_nbytes = 8 * K;
    r.aio_offset = 3 * M;
    r.aio_sigevent.sigev_notify = SIGEV_THREAD;
    r.aio_sigevent.sigev_notify_function = on_thread;
    r.aio_sigevent.sigev_value.sival_ptr = &r;
    memset(&q, 0, sizeof q);
    q.aio_fildes = reg;
    q.aio_buf = buf(0, 4 * K);
    q.aio_nbytes = 4 * K;
    q.aio_offset = 0;
    CHECK(aio_read(&q) == 0);
    CHECK(aio_read(&r) == 0);
    const struct aiocb *both[2] = {&q, &r};
    CHECK(aio_suspend(both, 2, NULL) == 0);
    wait_notified(1);
    CHECK(notified_value == &r);
    CHECK(aio_error(&r) == 0 && aio_return(&r) == 8 * K);
    CHECK(all((char *)r.aio_buf, 'P', 8 * K));
    /* The regular-file request completes through libc. */
    const struct aiocb *only_q[1] = {&q};
    while (aio_error(&q) == EINPROGRESS)
        CHECK(aio_suspend(only_q, 1, NULL) == 0);
    CHECK(aio_error(&q) == 0 && aio_return(&q) == 4 * K);
    CHECK(all((char *)q.aio_buf, 'B', 4 * K));

    /* lio_listio LIO_WAIT, mixed: image write, regular write, image NOP. */
    struct aiocb l[3];
    struct aiocb *ll[3] = {&l[0], &l[1], &l[2]};
    memset(l, 0, sizeof l);
    l[0].aio_fildes = img;
    l[0].aio_lio_opcode = LIO_WRITE;
    l[0].aio_buf = buf('L', 16 * K);
    l[0].aio_nbytes = 16 * K;
    l[0].aio_offset = 4 * M;
    l[1].aio_fildes = reg;
    l[1].aio_lio_opcode = LIO_WRITE;
    l[1].aio_buf = buf('W', 4 * K);
    l[1].aio_nbytes = 4 * K;
    l[1].aio_offset = 128 * K;
    l[2].aio_fildes = img;
    l[2].aio_lio_opcode = LIO_NOP;
    CHECK(lio_listio(LIO_WAIT, ll, 3, NULL) == 0);
    CHECK(aio_error(&l[0]) == 0 && aio_return(&l[0]) == 16 * K);
    CHECK(aio_error(&l[1]) == 0 && aio_return(&l[1]) == 4 * K);

    /* lio_listio LIO_NOWAIT, mixed, list notification by signal. */
    l[0].aio_lio_opcode = LIO_READ;
    l[0].aio_buf = buf(0, 16 * K);
    l[1].aio_lio_opcode = LIO_READ;
    l[1].aio_buf = buf(0, 4 * K);
    struct sigevent se;
    memset(&se, 0, sizeof se);
    se.sigev_notify = SIGEV_SIGNAL;
    se.sigev_signo = sig;
    se.sigev_value.sival_ptr = signal_value = &se;
    CHECK(lio_listio(LIO_NOWAIT, ll, 2, &se) == 0);
    wait_signals(2);
    CHECK(aio_error(&l[0]) == 0 && aio_return(&l[0]) == 16 * K);
    CHECK(aio_error(&l[1]) == 0 && aio_return(&l[1]) == 4 * K);
    CHECK(all((char *)l[0].aio_buf, 'L', 16 * K) && all((char *)l[1].aio_buf, 'W', 4 * K));

    /* lio_listio LIO_NOWAIT, image entries only, list notification by thread. */
    se.sigev_notify = SIGEV_THREAD;
    se.sigev_notify_function = on_thread;
    se.sigev_value.sival_ptr = &l;
    CHECK(lio_listio(LIO_NOWAIT, ll, 1, &se) == 0);
    wait_notified(2);
    CHECK(notified_value == &l);
    CHECK(aio_error(&l[0]) == 0 && aio_return(&l[0]) == 16 * K);

    /* aio_fsync, both kinds; aio_cancel finds everything done. */
    struct aiocb f;
    memset(&f, 0, sizeof f);
    f.aio_fildes = img;
    CHECK(aio_fsync(O_SYNC, &f) == 0);
    CHECK(aio_error(&f) == 0 && aio_return(&f) == 0);
    CHECK(aio_fsync(O_DSYNC, &f) == 0);
    CHECK(aio_error(&f) == 0 && aio_return(&f) == 0);
    CHECK(aio_fsync(12345, &f) == -1 && errno == EINVAL);
    CHECK(aio_cancel(img, NULL) == AIO_ALLDONE);
    CHECK(aio_cancel(img, &w) == AIO_ALLDONE);

    /* A read on a write-only image fd fails through aio_error. */
    struct aiocb bad;
    memset(&bad, 0, sizeof bad);
    bad.aio_fildes = img_wo;
    bad.aio_buf = buf(0, 512);
    bad.aio_nbytes = 512;
    CHECK(aio_read(&bad) == 0);
    CHECK(aio_error(&bad) == EBADF && aio_return(&bad) == -1);
}

int main(int argc, char **argv) {
    CHECK(argc == 3);
    resolve();
    int img = open(argv[1], O_RDWR);
    CHECK(img >= 0);
    int img_ro = open(argv[1], O_RDONLY);
    CHECK(img_ro >= 0);
    int reg = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0644);
    CHECK(reg >= 0);

    /* An access that bypasses the library fails instead of vanishing. */
    char *e = buf('!', 512);
    errno = 0;
    CHECK(syscall(SYS_pwrite64, img, e, 512, 0) == -1 && errno == EPERM);
    CHECK(syscall(SYS_write, img, e, 512) == -1 && errno == EPERM);
    CHECK(syscall(SYS_pread64, img, e, 512, 0) == 0);

    libaio_checks(img, reg, img_ro);
    close(img_ro);
    int img_wo = open(argv[1], O_WRONLY);
    CHECK(img_wo >= 0);
    posix_checks(img, reg, img_wo);
    close(img_wo);
    CHECK(fsync(img) == 0);
    CHECK(close(img) == 0);
    puts("ok");
    return 0;
}
