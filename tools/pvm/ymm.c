// Holds known values in ymm0 across a spin loop, while other copies of this
// program (in other processes) do the same, and counts the rounds where the
// register changed. A kernel that saves the AVX state at task switches
// never loses it; the pvm guest kernel (noxsave) on a PVM host does.
// Usage: ymm TAG SECONDS
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: ymm TAG SECONDS\n");
        return 2;
    }
    int tag = atoi(argv[1]);
    time_t end = time(0) + atoi(argv[2]);
    long rounds = 0, changed = 0;
    while (time(0) < end) {
        uint64_t in[4], out[4];
        for (int i = 0; i < 4; i++)
            in[i] = (uint64_t)tag << 56 | (uint64_t)rounds << 8 | i;
        uint64_t spins = 20000000;
        asm volatile("vmovdqu (%1), %%ymm0\n"
                     "1: dec %0\n jnz 1b\n"
                     "vmovdqu %%ymm0, (%2)\n vzeroupper\n"
                     : "+r"(spins)
                     : "r"(in), "r"(out)
                     : "memory", "xmm0");
        changed += memcmp(in, out, sizeof in) != 0;
        rounds++;
    }
    printf("ymm %d: %ld rounds, ymm0 changed in %ld\n", tag, rounds, changed);
    return changed != 0;
}
