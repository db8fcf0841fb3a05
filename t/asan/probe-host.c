/* The ASan self-check's host (t/asan/run.sh): an executable built by GCC with
 * -fsanitize=address, as nginx is, that dlopen()s an instrumented Rust cdylib (probe.rs)
 * and calls probe(kind). Each kind must end in its AddressSanitizer report. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    unsigned char (*probe)(int);
    void *h;

    if (argc != 3) {
        fprintf(stderr, "usage: %s LIBPROBE.so KIND\n", argv[0]);
        return 2;
    }
    h = dlopen(argv[1], RTLD_NOW);
    if (h == NULL) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
    probe = (unsigned char (*)(int)) dlsym(h, "probe");
    if (probe == NULL) {
        fprintf(stderr, "dlsym: %s\n", dlerror());
        return 2;
    }
    printf("probe %d returned %d: no report\n", atoi(argv[2]), probe(atoi(argv[2])));
    return 0;
}
