# speedrun.sh, ci preset, stage 3: prepare/arithmetic.py writes 3,000 train, 100 val and 200 test word problems
# (the evaluation reads the first 50 test problems, eval.py here). About 1 s.
n_train = 3000
n_val = 100
n_test = 200
