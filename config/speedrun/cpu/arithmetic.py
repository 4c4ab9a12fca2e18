# speedrun.sh, cpu preset, stage 3: prepare/arithmetic.py writes the synthetic word problems: train for SFT's
# conversations and RL's prompts, val for SFT's validation loss, and 400 held-out test problems for the
# evaluation (a standard error of about 2 points on an accuracy near 80%). A few seconds.
n_train = 10000
n_val = 200
n_test = 400
