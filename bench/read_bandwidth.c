/*
The memory-bandwidth ceiling of ./run: how fast this machine streams a buffer of the model file's size, read
over and over as run.c reads its weights once per token. bench/run_c.py builds it like `make runomp` and divides
the result by the bytes a token reads to get the tokens/s no matmul code can beat.

    cc -O3 -march=native -fopenmp -o read_bandwidth bench/read_bandwidth.c
    OMP_NUM_THREADS=2 ./read_bandwidth 61     # MB to stream; prints the best GB/s of 20 passes
*/
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double time_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char *argv[]) {
    if (argc != 2 || atol(argv[1]) <= 0) { fprintf(stderr, "usage: read_bandwidth <megabytes>\n"); return 1; }
    size_t bytes = (size_t)atol(argv[1]) << 20, n = bytes / sizeof(float);
    // 2 MB pages where the kernel gives them, as run.c asks for its model mapping
    float *data = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) { perror("mmap"); return 1; }
    madvise(data, bytes, MADV_HUGEPAGE);
    long i;  // each thread first touches the part it will read
    #pragma omp parallel for schedule(static)
    for (i = 0; i < (long)n; i++) data[i] = (float)(i & 7);
    double best = 0.0, checksum = 0.0;
    for (int pass = 0; pass < 20; pass++) {
        double t0 = time_s();
        float sum = 0.0f;
        #pragma omp parallel for simd schedule(static) reduction(+:sum)
        for (i = 0; i < (long)n; i++) sum += data[i];
        double gb_per_s = bytes / (time_s() - t0) / 1e9;
        checksum += sum;  // (used, so the reads are not optimized away)
        if (gb_per_s > best) best = gb_per_s;
    }
    printf("%.2f GB/s (checksum %g)\n", best, checksum);
    return 0;
}
