# speedrun.sh, cpu preset, stage 4: rl.py improves the SFT model on the arithmetic problems from its own checked
# answers. 100 steps of 16 problems x 8 samples of up to 64 tokens.
# MEASURED (2-core AMD EPYC, fp32): 5m53s; mean training reward 0.44 -> 0.69 (first / last 5 steps); held-out
# greedy accuracy 73.2 +- 2.2% -> 86.2 +- 1.7%, +13.0 +- 1.9 points on the same 400 problems (paired).
# The learning rate is SFT's final rate (a tenth of its peak). Sampling at temperature 0.7 keeps the replies near
# the greedy ones the evaluation reads: from the same SFT model, greedy accuracy went 0.73 -> 0.80 in 60 steps at
# 0.7, but 0.73 -> 0.66 in 100 steps at 1.0 (and at 3e-4 and 1.0: 0.61 -> 0.56).
max_iters = 100
num_prompts = 16
num_samples = 8
max_new_tokens = 64
learning_rate = 1e-4
temperature = 0.7
warmup_iters = 5
eval_interval = 50
eval_problems = 400  # all the test problems
eval_samples = 0  # greedy accuracy only: pass@k sampling would double the evaluation time
