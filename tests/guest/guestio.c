/* guestio: the test guest's writer and latency probe (static, runs from the initramfs).
 *
 *   guestio write TAG FILE [PACE_MS]  numbered, checksummed 64-byte records, each made
 *                                     durable with fdatasync before "A TAG N" is printed
 *   guestio probe TAG FILE [PACE_MS]  small O_DSYNC writes; every 100 ms prints
 *                                     "P TAG N MAXGAP_US", the longest gap between two
 *                                     consecutive completions in that period
 *   guestio check FILE                the records a file holds: "C COUNT" (the valid ones
 *                                     in a row from record 0), exit 1 if a bad one follows
 *   guestio pair TAG FILEA FILEB [PACE_MS]
 *                                     dependent pairs: record K in FILEA, fdatasync, then
 *                                     mark K (the same record) in FILEB, fdatasync, then
 *                                     "A TAG K"; so FILEB never holds more than FILEA
 *   guestio mark TAG FILE UPTO        records up to UPTO appended to FILE and made durable,
 *                                     then "A TAG UPTO" (a mark relayed from elsewhere)
 *
 * Lines go to stdout, which the guest's init points at the serial console: the host reads
 * them from the console log without asking the guest anything. A writer resumes after the
 * last valid record it finds, so a restarted guest goes on numbering. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define RECORD 64

static uint32_t crc32(const unsigned char *data, size_t length) {
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i < length; i++) {
        crc ^= data[i];
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

/* "R <seq:10> <crc32 of the 12 bytes before it:8 hex>", '.' up to byte 63, then '\n' */
static void make_record(unsigned long seq, char *out) {
    char text[RECORD];
    int head = snprintf(text, sizeof text, "R %010lu", seq % 10000000000ul);
    snprintf(text + head, sizeof text - head, " %08x",
             crc32((const unsigned char *)text, (size_t)head));
    memset(out, '.', RECORD);
    memcpy(out, text, strlen(text));
    out[RECORD - 1] = '\n';
}

static int record_ok(const char *record, unsigned long seq) {
    char expected[RECORD];
    make_record(seq, expected);
    return memcmp(record, expected, RECORD) == 0;
}

static unsigned long count_valid(int fd, int *bad_after) {
    char record[RECORD];
    unsigned long seq = 0;
    *bad_after = 0;
    while (pread(fd, record, RECORD, (off_t)seq * RECORD) == RECORD) {
        if (!record_ok(record, seq)) {
            for (size_t i = 0; i < RECORD; i++)
                if (record[i] != 0) { *bad_after = 1; break; }
            break;
        }
        seq++;
    }
    return seq;
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void pace(long ms) {
    if (ms > 0) {
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
}

static int writer(const char *tag, const char *path, long pace_ms) {
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) { printf("E %s open %d\n", tag, errno); return 1; }
    int bad;
    unsigned long seq = count_valid(fd, &bad);
    printf("S %s %lu\n", tag, seq);
    fflush(stdout);
    char record[RECORD];
    for (;; seq++) {
        make_record(seq, record);
        if (pwrite(fd, record, RECORD, (off_t)seq * RECORD) != RECORD || fdatasync(fd) != 0) {
            printf("E %s %lu %d\n", tag, seq, errno);
            fflush(stdout);
            return 1;
        }
        printf("A %s %lu\n", tag, seq);
        fflush(stdout);
        pace(pace_ms);
    }
}

static int open_records(const char *tag, const char *path) {
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) { printf("E %s open %d\n", tag, errno); fflush(stdout); }
    return fd;
}

static int put_record(int fd, unsigned long seq) {
    char record[RECORD];
    make_record(seq, record);
    if (pwrite(fd, record, RECORD, (off_t)seq * RECORD) != RECORD) return -1;
    return fdatasync(fd);
}

static int pairs(const char *tag, const char *path_a, const char *path_b, long pace_ms) {
    int a = open_records(tag, path_a), b = open_records(tag, path_b), bad;
    if (a < 0 || b < 0) return 1;
    unsigned long in_a = count_valid(a, &bad), seq = count_valid(b, &bad);
    if (in_a < seq) seq = in_a; /* never a hole in FILEA (a broken invariant shows offline) */
    printf("S %s %lu\n", tag, seq);
    fflush(stdout);
    for (;; seq++) {
        if (put_record(a, seq) != 0 || put_record(b, seq) != 0) {
            printf("E %s %lu %d\n", tag, seq, errno);
            fflush(stdout);
            return 1;
        }
        printf("A %s %lu\n", tag, seq);
        fflush(stdout);
        pace(pace_ms);
    }
}

static int mark(const char *tag, const char *path, unsigned long upto) {
    int fd = open_records(tag, path), bad;
    if (fd < 0) return 1;
    for (unsigned long seq = count_valid(fd, &bad); seq <= upto; seq++) {
        char record[RECORD];
        make_record(seq, record);
        if (pwrite(fd, record, RECORD, (off_t)seq * RECORD) != RECORD) {
            printf("E %s %lu %d\n", tag, seq, errno);
            return 1;
        }
    }
    if (fdatasync(fd) != 0) { printf("E %s %lu %d\n", tag, upto, errno); return 1; }
    printf("A %s %lu\n", tag, upto);
    return 0;
}

static int probe(const char *tag, const char *path, long pace_ms) {
    int fd = open(path, O_RDWR | O_CREAT | O_DSYNC, 0644);
    if (fd < 0) { printf("E %s open %d\n", tag, errno); return 1; }
    char block[512];
    memset(block, 'p', sizeof block);
    double last = now_us(), period_start = last, longest = 0;
    for (unsigned long n = 0;; n++) {
        if (pwrite(fd, block, sizeof block, 0) != (ssize_t)sizeof block) {
            printf("E %s probe %d\n", tag, errno);
            fflush(stdout);
            return 1;
        }
        double done = now_us();
        if (done - last > longest) longest = done - last;
        last = done;
        if (done - period_start >= 100000) {
            printf("P %s %lu %.0f\n", tag, n, longest);
            fflush(stdout);
            longest = 0;
            period_start = done;
        }
        pace(pace_ms);
    }
}

static int check(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) { printf("E check open %d\n", errno); return 2; }
    int bad;
    unsigned long count = count_valid(fd, &bad);
    printf("C %lu%s\n", count, bad ? " BAD" : "");
    return bad;
}

int main(int argc, char **argv) {
    if (argc >= 4 && strcmp(argv[1], "write") == 0)
        return writer(argv[2], argv[3], argc > 4 ? atol(argv[4]) : 20);
    if (argc >= 4 && strcmp(argv[1], "probe") == 0)
        return probe(argv[2], argv[3], argc > 4 ? atol(argv[4]) : 5);
    if (argc == 3 && strcmp(argv[1], "check") == 0)
        return check(argv[2]);
    if (argc >= 5 && strcmp(argv[1], "pair") == 0)
        return pairs(argv[2], argv[3], argv[4], argc > 5 ? atol(argv[5]) : 5);
    if (argc == 5 && strcmp(argv[1], "mark") == 0)
        return mark(argv[2], argv[3], strtoul(argv[4], NULL, 10));
    fprintf(stderr, "usage: guestio write|probe TAG FILE [PACE_MS] | guestio check FILE |\n"
                    "       guestio pair TAG FILEA FILEB [PACE_MS] | guestio mark TAG FILE UPTO\n");
    return 2;
}
