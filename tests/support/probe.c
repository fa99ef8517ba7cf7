/* Asks the kernel for one thing a container's root should not get, prints the answer.
 *
 * Usage: probe WHAT [ARG...]; prints "ok" or the errno's number and exits 0, so the
 * test reads the kernel's answer rather than a shell's wording. Arguments are chosen
 * so that a call the kernel lets through does nothing harmful: no module image, no
 * kexec image, a null time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <grp.h>
#include <sys/time.h>
#include <unistd.h>

static int answer(long rc) {
    if (rc < 0)
        printf("%d\n", errno);
    else
        printf("ok\n");
    return 0;
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "";
    const char *arg = argc > 2 ? argv[2] : "/";
    if (!strcmp(what, "init_module"))
        return answer(syscall(SYS_init_module, NULL, 0, ""));
    if (!strcmp(what, "finit_module"))
        return answer(syscall(SYS_finit_module, -1, "", 0));
    if (!strcmp(what, "delete_module"))
        return answer(syscall(SYS_delete_module, "qvd_no_such_module", O_NONBLOCK));
    if (!strcmp(what, "kexec_load"))
        return answer(syscall(SYS_kexec_load, 0, 0, NULL, 0));
    if (!strcmp(what, "kexec_file_load"))
        return answer(syscall(SYS_kexec_file_load, -1, -1, 0, "", 0));
    if (!strcmp(what, "open_by_handle_at"))
        return answer(syscall(SYS_open_by_handle_at, AT_FDCWD, NULL, O_RDONLY));
    if (!strcmp(what, "keyctl")) /* KEYCTL_GET_KEYRING_ID of the session keyring */
        return answer(syscall(SYS_keyctl, 0, -3, 0));
    if (!strcmp(what, "add_key"))
        return answer(syscall(SYS_add_key, "user", "qvd-probe", "x", 1, -3));
    if (!strcmp(what, "request_key"))
        return answer(syscall(SYS_request_key, "user", "qvd-probe", NULL, -3));
    if (!strcmp(what, "settimeofday"))
        return answer(syscall(SYS_settimeofday, NULL, NULL));
    if (!strcmp(what, "read")) {
        char buf[512];
        int fd = open(arg, O_RDONLY);
        return answer(fd < 0 ? -1 : read(fd, buf, sizeof buf));
    }
    if (!strcmp(what, "mount_cgroup"))
        return answer(mount("cgroup", arg, "cgroup", 0, "memory"));
    if (!strcmp(what, "mount_cgroup2"))
        return answer(mount("cgroup2", arg, "cgroup2", 0, NULL));
    if (!strcmp(what, "as") && argc > 3) { /* probe as UID PROG ARGS: run PROG as UID */
        unsigned id = (unsigned)atoi(argv[2]);
        if (setgroups(0, NULL) || setgid(id) || setuid(id))
            return answer(-1);
        execv(argv[3], argv + 3);
        return answer(-1);
    }
    if (!strcmp(what, "euid")) {
        printf("%u\n", (unsigned)geteuid());
        return 0;
    }
    if (!strcmp(what, "permitted")) { /* this process's CapPrm, as file capabilities gave it */
        char line[256];
        FILE *f = fopen("/proc/self/status", "r");
        while (f && fgets(line, sizeof line, f))
            if (!strncmp(line, "CapPrm:", 7))
                printf("%s", line + 8);
        return 0;
    }
    fprintf(stderr, "probe: unknown request %s\n", what);
    return 2;
}
