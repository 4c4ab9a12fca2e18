# C inference: build run.c into ./run (or ./runfast, ./runomp, ./rundebug).
CC ?= cc

# portable and safe: -O3, no CPU-specific instructions (int8 matmuls use the portable C loop)
run: run.c
	$(CC) -O3 -fopenmp-simd -o run run.c -lm

# for this machine: -march=native enables AVX2 / AVX-512 VNNI int8 kernels and wide float vectors.
# No -ffast-math: the float reductions are vectorized with `omp simd` pragmas instead, so NaN and
# infinity handling stay exact; only the order of additions in dot products changes (the softmaxes use
# run.c's own vectorizable e^x, within float rounding of expf).
runfast: run.c
	$(CC) -O3 -march=native -fopenmp-simd -o run run.c -lm

# the same with OpenMP threads: OMP_NUM_THREADS=2 ./run model.bin ... (the build bench/run_c.py measures;
# rows of each matmul and heads of attention are split between the threads, so results equal one thread's)
runomp: run.c
	$(CC) -O3 -march=native -fopenmp -o run run.c -lm

# AddressSanitizer and UndefinedBehaviorSanitizer, for tests and debugging
debug: run.c
	$(CC) -g -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -o rundebug run.c -lm

clean:
	rm -f run runfast runomp rundebug

.PHONY: run runfast runomp debug clean
