// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * sealvm's cpr-exec trampoline: QEMU exec()s this instead of the new QEMU.
 *
 *     sealvm-exec-trampoline KEEPER-SOCKET -- NEW-QEMU-ARGV...
 *
 * It runs in the QEMU process between the two images, holding every fd the
 * old QEMU preserved for cpr-exec (guest-RAM memfds, the CPR state memfd,
 * the QMP listener, VFIO fds).  It hands a copy of each to sealvm's keeper
 * (SCM_RIGHTS, with their numbers) and exec()s the new QEMU with the same
 * environment and fds.  It does not wait for the keeper: fds in flight in a
 * unix socket's queue are held by the kernel until the keeper receives them,
 * so the keeper's scheduling never adds to the guest's pause.  If the new
 * QEMU then dies or hangs while loading, the keeper can start the previous
 * QEMU on the same memory and CPR state: cpr-exec gets a way back.
 *
 * Nothing here may stop the update: if the keeper cannot be reached, the
 * new QEMU is exec'd all the same (without a way back) and that is said on
 * stderr (QEMU's log).
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FDS 250 /* below the kernel's SCM_MAX_FD (253) */

static int collect(int skip1, int skip2, int *fds)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    if (!d) {
        return -1;
    }
    while ((e = readdir(d)) != NULL && n < MAX_FDS) {
        char *end;
        long fd = strtol(e->d_name, &end, 10);

        if (*end || end == e->d_name || fd <= 2 || fd == skip1 || fd == skip2 ||
            fd == dirfd(d)) {
            continue;
        }
        fds[n++] = (int)fd;
    }
    closedir(d);
    return n;
}

static int hand_over(const char *path)
{
    static int fds[MAX_FDS];
    static char text[MAX_FDS * 12 + 256];
    union {
        struct cmsghdr hdr;
        char buf[CMSG_SPACE(sizeof(fds))];
    } ctl;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct timeval tv = { .tv_sec = 5 }; /* a full queue: do not hang */
    struct msghdr msg = { 0 };
    struct iovec iov;
    struct cmsghdr *cm;
    const char *state = getenv("QEMU_CPR_EXEC_STATE");
    const char *holder = getenv("QEMU_CPR_EXEC_HOLDER"); /* "pid,fd" */
    const char *comma = holder ? strchr(holder, ',') : NULL;
    size_t len = 0;
    int s, n, i;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        return -1;
    }
    strcpy(sa.sun_path, path);
    s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        return -1;
    }
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        close(s);
        return -1;
    }
    /* the address-space holder's pipe (patch 20) is not the keeper's to hold */
    n = collect(s, comma ? atoi(comma + 1) : -1, fds);
    if (n < 0) {
        close(s);
        return -1;
    }
    len = snprintf(text, sizeof(text), "fds state=%s", state ? state : "-");
    for (i = 0; i < n; i++) {
        len += snprintf(text + len, sizeof(text) - len, " %d", fds[i]);
    }
    text[len++] = '\n';
    iov.iov_base = text;
    iov.iov_len = len;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (n > 0) {
        memset(&ctl, 0, sizeof(ctl));
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE(n * sizeof(int));
        cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(n * sizeof(int));
        memcpy(CMSG_DATA(cm), fds, n * sizeof(int));
    }
    if (sendmsg(s, &msg, MSG_NOSIGNAL) != (ssize_t)len) {
        close(s);
        return -1;
    }
    close(s);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4 || strcmp(argv[2], "--") != 0) {
        fprintf(stderr, "usage: %s KEEPER-SOCKET -- QEMU-ARGV...\n", argv[0]);
        return 2;
    }
    if (hand_over(argv[1]) < 0) {
        fprintf(stderr, "sealvm-exec-trampoline: keeper %s unreachable: "
                "no way back for this update\n", argv[1]);
    }
    execv(argv[3], argv + 3);
    perror("sealvm-exec-trampoline: execv");
    return 127;
}
