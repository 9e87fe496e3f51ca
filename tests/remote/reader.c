/* The restart tests' reader: reads files in a loop, through read(2) or mmap(2), and prints one
 * line per file read: "<CLOCK_MONOTONIC ms> <path> <FNV-1a 64 hex>" or "<ms> <path> ERR <errno>".
 * After each file it drops the file's pages (posix_fadvise DONTNEED), so the next pass asks the
 * FUSE daemon again. Usage: reader read|mmap PAUSE_MS FILE... (forever; built -static). */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static int check(const char *path, int use_mmap, uint64_t *out) {
    static unsigned char buf[1 << 16];
    uint64_t h = 0xcbf29ce484222325ULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return errno;
    struct stat st;
    if (fstat(fd, &st) != 0) { int e = errno; close(fd); return e; }
    if (use_mmap && st.st_size > 0) {
        unsigned char *p = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) { int e = errno; close(fd); return e; }
        h = fnv(h, p, st.st_size); /* a failed page-in is SIGBUS: the reader dies, the test sees it */
        munmap(p, st.st_size);
    } else {
        for (;;) {
            ssize_t n = read(fd, buf, sizeof buf);
            if (n < 0) { int e = errno; close(fd); return e; }
            if (n == 0) break;
            h = fnv(h, buf, n);
        }
    }
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
    *out = h;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: reader read|mmap PAUSE_MS FILE...\n"); return 2; }
    int use_mmap = strcmp(argv[1], "mmap") == 0;
    long pause_ms = atol(argv[2]);
    struct timespec pause = {pause_ms / 1000, (pause_ms % 1000) * 1000000};
    for (;;) {
        for (int i = 3; i < argc; i++) {
            uint64_t h = 0;
            int err = check(argv[i], use_mmap, &h);
            if (err) printf("%lld %s ERR %d\n", now_ms(), argv[i], err);
            else printf("%lld %s %016llx\n", now_ms(), argv[i], (unsigned long long)h);
            fflush(stdout);
            nanosleep(&pause, NULL);
        }
    }
}
