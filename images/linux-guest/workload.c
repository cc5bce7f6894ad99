/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * sealvm Linux test guest: the workload (PID 1 after init's setup).
 *
 * Prints on the console in the format sealvm.console reads:
 *
 *   SEALVM-GUEST v1 kind=linux ram=<bytes> hb_ms=<n> pattern=on cmdline="..."
 *   HB <seq> t=<ms> gen=<g> mism=<n> tcp_in=<b> tcp_bad=<n> tcp_out=<b>
 *      udp=<n> dw=<n> dbad=<n> dpass=<n>
 *   PASS gen=<g> mism=<n> ms=<t>
 *   MISMATCH gen=<g> addr=0x<a> words=<n> expected=0x<e> got=0x<v>
 *   DPASS n=<k> blocks=<N> bad=<b> ms=<t>
 *   DISKBAD lba=<l> why=<magic|lba|seq|csum|io> seq=<s> expected=<e>
 *
 * and runs, each in a thread of its own:
 *
 * - the memory pattern (nice 19): pass g checks that every 64-bit word of
 *   its region holds pattern(addr, g - 1) and writes pattern(addr, g), as
 *   the bare-metal guest does; the region is sealvm.pattern= (e.g. "64M"
 *   or "25%" of MemTotal);
 * - TCP 7000, echo: what a client sends must be the byte sequence
 *   stream(0, i) (checked, tcp_bad counts bytes that differ) and is sent
 *   back unchanged;
 * - TCP 7001, stream: sends stream(1, i) to each client, 1 KiB every 10 ms;
 * - UDP 7002: answers each datagram with the same bytes (the client's
 *   sequence number) followed by the guest's own reply count;
 * - the disk (sealvm.disk=, default /dev/vda, raw, O_DIRECT): formats every
 *   4 KiB block, then forever writes (fdatasync) one block every sealvm.disk_ms (magic,
 *   lba, sequence number, payload from the sequence number, FNV-1a checksum),
 *   reads it back, and every sealvm.dpass_ms re-reads every block, checking
 *   that each holds exactly the last write the guest made to it.
 *
 * stream(k, i): byte i%8 (little endian) of splitmix64(k << 40 | i / 8).
 * Every console line is written with one write(2), so threads never mix.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

typedef uint64_t u64;

#define PORT_ECHO 7000
#define PORT_STREAM 7001
#define PORT_UDP 7002
#define BLK 4096
#define MAGIC 0x5345414c564d424bULL /* "SEALVMBK" */

static char cmdline[1024];
static u64 hb_ms = 20, disk_ms = 10, dpass_ms = 2000;
static char pattern_arg[32] = "25%";
static char disk_path[64] = "/dev/vda";
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

/* counters read by the heartbeat (word-sized, written by one thread each) */
static volatile u64 gen, mism_total;
static volatile u64 tcp_in, tcp_bad, tcp_out, udp_replies;
static volatile u64 disk_writes, disk_bad, disk_passes;

static u64 now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (u64)ts.tv_sec * 1000 + (u64)ts.tv_nsec / 1000000;
}

static void out(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    if (n > (int)sizeof(buf) - 2) {
        n = sizeof(buf) - 2;
    }
    buf[n++] = '\n';
    pthread_mutex_lock(&out_lock);
    if (write(1, buf, n) < 0) {
        /* nowhere to report it */
    }
    pthread_mutex_unlock(&out_lock);
}

static void sleep_ms(u64 ms)
{
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000 };

    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static u64 splitmix64(u64 k)
{
    u64 z = k + 0x9E3779B97F4A7C15ULL;

    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static unsigned char stream_byte(u64 key, u64 i)
{
    return (unsigned char)(splitmix64(key << 40 | i / 8) >> (8 * (i % 8)));
}

/* ------------------------------------------------------------- config */

static const char *arg(const char *key)
{
    size_t len = strlen(key);
    const char *p = cmdline;

    while ((p = strstr(p, key)) != NULL) {
        if ((p == cmdline || p[-1] == ' ') && p[len] == '=') {
            return p + len + 1;
        }
        p += len;
    }
    return NULL;
}

static void arg_str(const char *key, char *dst, size_t size)
{
    const char *v = arg(key);
    size_t n = 0;

    if (!v) {
        return;
    }
    while (v[n] && v[n] != ' ' && v[n] != '\n' && n < size - 1) {
        n++;
    }
    memcpy(dst, v, n);
    dst[n] = 0;
}

static void arg_u64(const char *key, u64 *dst)
{
    const char *v = arg(key);

    if (v) {
        *dst = strtoull(v, NULL, 0);
    }
}

static void read_config(void)
{
    int fd = open("/proc/cmdline", O_RDONLY);
    ssize_t n = fd >= 0 ? read(fd, cmdline, sizeof(cmdline) - 1) : -1;

    if (fd >= 0) {
        close(fd);
    }
    cmdline[n > 0 ? n : 0] = 0;
    if (n > 0 && cmdline[n - 1] == '\n') {
        cmdline[n - 1] = 0;
    }
    arg_u64("sealvm.hb_ms", &hb_ms);
    arg_u64("sealvm.disk_ms", &disk_ms);
    arg_u64("sealvm.dpass_ms", &dpass_ms);
    arg_str("sealvm.pattern", pattern_arg, sizeof(pattern_arg));
    arg_str("sealvm.disk", disk_path, sizeof(disk_path));
}

/* ------------------------------------------------------------ pattern */

static u64 *region;
static u64 region_words;

static inline u64 pattern(u64 a, u64 g)
{
    return (a * 0x9E3779B97F4A7C15ULL) ^ (g * 0xC2B2AE3D27D4EB4FULL) ^
           0x5EA1ED0000000000ULL;
}

static void *pattern_thread(void *unused)
{
    u64 run_addr = 0, run_words = 0, run_exp = 0, run_got = 0;

    (void)unused;
    setpriority(PRIO_PROCESS, 0, 19);
    for (;;) {
        u64 g = gen, mism_pass = 0, start = now_ms(), i;

        for (i = 0; i < region_words; i++) {
            u64 a = (u64)(uintptr_t)&region[i];

            if (g) {
                u64 expected = pattern(a, g - 1), got = region[i];

                if (got != expected) {
                    mism_pass++;
                    mism_total++;
                    if (run_words && a == run_addr + run_words * 8) {
                        run_words++;
                    } else {
                        if (run_words) {
                            out("MISMATCH gen=%llu addr=0x%llx words=%llu expected=0x%llx "
                                "got=0x%llx", (unsigned long long)(g - 1),
                                (unsigned long long)run_addr,
                                (unsigned long long)run_words,
                                (unsigned long long)run_exp, (unsigned long long)run_got);
                        }
                        run_addr = a;
                        run_words = 1;
                        run_exp = expected;
                        run_got = got;
                    }
                }
            }
            region[i] = pattern(a, g);
        }
        if (run_words) {
            out("MISMATCH gen=%llu addr=0x%llx words=%llu expected=0x%llx got=0x%llx",
                (unsigned long long)(g - 1), (unsigned long long)run_addr,
                (unsigned long long)run_words, (unsigned long long)run_exp,
                (unsigned long long)run_got);
            run_words = 0;
        }
        out("PASS gen=%llu mism=%llu ms=%llu", (unsigned long long)g,
            (unsigned long long)mism_pass, (unsigned long long)(now_ms() - start));
        gen = g + 1;
    }
    return NULL;
}

static u64 pattern_bytes(u64 ram)
{
    char *end;
    u64 v = strtoull(pattern_arg, &end, 0);

    switch (*end) {
    case '%':
        return ram / 100 * v;
    case 'G': case 'g':
        return v << 30;
    case 'M': case 'm':
        return v << 20;
    case 'K': case 'k':
        return v << 10;
    default:
        return v;
    }
}

/* ---------------------------------------------------------------- net */

static int listen_on(int type, int port)
{
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
    int one = 1, s = socket(AF_INET, type, 0);

    if (s < 0) {
        return -1;
    }
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(s, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
        (type == SOCK_STREAM && listen(s, 8) < 0)) {
        out("NET error port=%d errno=%d", port, errno);
        close(s);
        return -1;
    }
    return s;
}

static int write_all(int fd, const unsigned char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        buf += n;
        len -= n;
    }
    return 0;
}

static void *echo_conn(void *opaque)
{
    int c = (int)(intptr_t)opaque;
    unsigned char buf[16384];
    u64 off = 0;
    ssize_t n, i;

    while ((n = read(c, buf, sizeof(buf))) > 0 || (n < 0 && errno == EINTR)) {
        for (i = 0; i < n; i++) {
            if (buf[i] != stream_byte(0, off + i)) {
                tcp_bad++;
            }
        }
        off += n;
        tcp_in += n;
        if (n > 0 && write_all(c, buf, n) < 0) {
            break;
        }
    }
    out("TCP echo closed in=%llu", (unsigned long long)off);
    close(c);
    return NULL;
}

static void *stream_conn(void *opaque)
{
    int c = (int)(intptr_t)opaque;
    unsigned char buf[1024];
    u64 off = 0;
    size_t i;

    for (;;) {
        for (i = 0; i < sizeof(buf); i++) {
            buf[i] = stream_byte(1, off + i);
        }
        if (write_all(c, buf, sizeof(buf)) < 0) {
            break;
        }
        off += sizeof(buf);
        tcp_out += sizeof(buf);
        sleep_ms(10);
    }
    out("TCP stream closed out=%llu", (unsigned long long)off);
    close(c);
    return NULL;
}

static void *acceptor(void *opaque)
{
    int port = (int)(intptr_t)opaque;
    int s = listen_on(SOCK_STREAM, port), one = 1;

    while (s >= 0) {
        int c = accept(s, NULL, NULL);
        pthread_t t;

        if (c < 0) {
            continue;
        }
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        out("TCP accepted port=%d", port);
        pthread_create(&t, NULL, port == PORT_ECHO ? echo_conn : stream_conn,
                       (void *)(intptr_t)c);
        pthread_detach(t);
    }
    return NULL;
}

static void *udp_thread(void *unused)
{
    int s = listen_on(SOCK_DGRAM, PORT_UDP);
    unsigned char buf[2048];

    (void)unused;
    while (s >= 0) {
        struct sockaddr_in from;
        socklen_t fl = sizeof(from);
        ssize_t n = recvfrom(s, buf, sizeof(buf) - 8, 0, (struct sockaddr *)&from, &fl);
        u64 count;

        if (n < 0) {
            continue;
        }
        count = ++udp_replies;
        memcpy(buf + n, &count, 8);
        sendto(s, buf, n + 8, 0, (struct sockaddr *)&from, fl);
    }
    return NULL;
}

/* --------------------------------------------------------------- disk */

struct block {
    u64 magic;
    u64 lba;
    u64 seq;
    unsigned char payload[BLK - 32];
    u64 csum;
};

static u64 fnv1a(const void *p, size_t len)
{
    const unsigned char *b = p;
    u64 h = 0xcbf29ce484222325ULL;

    while (len--) {
        h = (h ^ *b++) * 0x100000001b3ULL;
    }
    return h;
}

static void fill_block(struct block *b, u64 lba, u64 seq)
{
    size_t i;

    b->magic = MAGIC;
    b->lba = lba;
    b->seq = seq;
    for (i = 0; i < sizeof(b->payload); i += 8) {
        u64 v = splitmix64(seq << 20 ^ i);

        memcpy(b->payload + i, &v, 8);
    }
    b->csum = fnv1a(b, offsetof(struct block, csum));
}

/* 0 when the block holds write *seq* of *lba*; else prints why. */
static int check_block(const struct block *b, u64 lba, u64 seq)
{
    const char *why = NULL;

    if (b->magic != MAGIC) {
        why = "magic";
    } else if (b->lba != lba) {
        why = "lba";
    } else if (b->csum != fnv1a(b, offsetof(struct block, csum))) {
        why = "csum";
    } else if (b->seq != seq) {
        why = "seq";
    }
    if (!why) {
        return 0;
    }
    disk_bad++;
    out("DISKBAD lba=%llu why=%s seq=%llu expected=%llu", (unsigned long long)lba, why,
        (unsigned long long)b->seq, (unsigned long long)seq);
    return -1;
}

static int pio(int fd, struct block *b, u64 lba, int wr)
{
    ssize_t n = wr ? pwrite(fd, b, BLK, lba * BLK) : pread(fd, b, BLK, lba * BLK);

    if (n == BLK) {
        return 0;
    }
    disk_bad++;
    out("DISKBAD lba=%llu why=io wr=%d ret=%lld errno=%d", (unsigned long long)lba, wr,
        (long long)n, errno);
    return -1;
}

static void *disk_thread(void *unused)
{
    int fd = open(disk_path, O_RDWR | O_DIRECT);
    u64 size = 0, nblocks, lba, seq = 0, next_pass, start;
    u64 *last;
    struct block *b;

    (void)unused;
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) < 0 || size < BLK) {
        out("DISK none path=%s errno=%d", disk_path, errno);
        return NULL;
    }
    nblocks = size / BLK;
    last = calloc(nblocks, sizeof(*last));
    if (!last || posix_memalign((void **)&b, BLK, BLK)) {
        out("DISK none path=%s no memory", disk_path);
        return NULL;
    }
    start = now_ms();
    for (lba = 0; lba < nblocks; lba++) {
        fill_block(b, lba, ++seq);
        if (pio(fd, b, lba, 1) == 0) {
            last[lba] = seq;
        }
    }
    fdatasync(fd);
    out("DISK formatted path=%s blocks=%llu ms=%llu", disk_path,
        (unsigned long long)nblocks, (unsigned long long)(now_ms() - start));
    next_pass = now_ms();
    for (;;) {
        if (now_ms() >= next_pass) {
            u64 bad = disk_bad;

            start = now_ms();
            for (lba = 0; lba < nblocks; lba++) {
                if (pio(fd, b, lba, 0) == 0) {
                    check_block(b, lba, last[lba]);
                }
            }
            disk_passes++;
            out("DPASS n=%llu blocks=%llu bad=%llu ms=%llu", (unsigned long long)disk_passes,
                (unsigned long long)nblocks, (unsigned long long)(disk_bad - bad),
                (unsigned long long)(now_ms() - start));
            next_pass = now_ms() + dpass_ms;
        }
        seq++;
        lba = seq % nblocks;
        fill_block(b, lba, seq);
        if (pio(fd, b, lba, 1) == 0 && fdatasync(fd) == 0) {
            last[lba] = seq;
            if (pio(fd, b, lba, 0) == 0) {
                check_block(b, lba, seq);
            }
        }
        disk_writes++;
        sleep_ms(disk_ms);
    }
    return NULL;
}

/* --------------------------------------------------------------- main */

int main(void)
{
    struct sysinfo si;
    u64 ram, bytes, seq = 0, next;
    pthread_t t;

    read_config();
    sysinfo(&si);
    ram = (u64)si.totalram * si.mem_unit;
    bytes = pattern_bytes(ram) & ~4095ULL;
    region = mmap(NULL, bytes ? bytes : 4096, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (region == MAP_FAILED) {
        out("SEALVM-GUEST error: cannot map %llu bytes", (unsigned long long)bytes);
        return 1;
    }
    region_words = bytes / 8;
    out("SEALVM-GUEST v1 kind=linux ram=%llu hb_ms=%llu pattern=on pattern_bytes=%llu "
        "cmdline=\"%s\"", (unsigned long long)ram, (unsigned long long)hb_ms,
        (unsigned long long)bytes, cmdline);
    pthread_create(&t, NULL, acceptor, (void *)(intptr_t)PORT_ECHO);
    pthread_create(&t, NULL, acceptor, (void *)(intptr_t)PORT_STREAM);
    pthread_create(&t, NULL, udp_thread, NULL);
    pthread_create(&t, NULL, disk_thread, NULL);
    pthread_create(&t, NULL, pattern_thread, NULL);
    next = now_ms();
    for (;;) {
        u64 now = now_ms();

        if (now < next) {
            sleep_ms(next - now);
            continue;
        }
        out("HB %llu t=%llu gen=%llu mism=%llu tcp_in=%llu tcp_bad=%llu tcp_out=%llu "
            "udp=%llu dw=%llu dbad=%llu dpass=%llu", (unsigned long long)seq++,
            (unsigned long long)now, (unsigned long long)gen,
            (unsigned long long)mism_total, (unsigned long long)tcp_in,
            (unsigned long long)tcp_bad, (unsigned long long)tcp_out,
            (unsigned long long)udp_replies, (unsigned long long)disk_writes,
            (unsigned long long)disk_bad, (unsigned long long)disk_passes);
        next += hb_ms;
        if (next <= now) {
            next = now + hb_ms; /* never burst to catch up */
        }
    }
}
