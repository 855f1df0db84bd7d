// Maps 1 MiB, fills it (with stores, or with glibc's memcpy from a buffer),
// checks every word and unmaps it, again and again, while other copies of
// this program do the same; counts the rounds where the memory did not hold
// what this process wrote. Usage: mem TAG SECONDS stores|memcpy
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: mem TAG SECONDS stores|memcpy\n");
        return 2;
    }
    int tag = atoi(argv[1]);
    time_t end = time(0) + atoi(argv[2]);
    int copy = strcmp(argv[3], "memcpy") == 0;
    size_t len = 1 << 20, words = len / 8;
    uint64_t *src = malloc(len);
    long rounds = 0, bad = 0;
    while (time(0) < end) {
        uint64_t *p = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED || !src) {
            perror("mem");
            return 2;
        }
        uint64_t base = (uint64_t)tag << 48 | (uint64_t)rounds << 20;
        for (size_t i = 0; i < words; i++)
            (copy ? src : p)[i] = base + i;
        if (copy)
            memcpy(p, src, len);
        for (size_t i = 0; i < words; i++)
            if (p[i] != base + i) {
                bad++;
                break;
            }
        munmap(p, len);
        rounds++;
    }
    printf("mem %d (%s): %ld rounds, %ld wrong\n", tag, argv[3], rounds, bad);
    return bad != 0;
}
