# speedrun.sh, ci preset, stage 4: rl.py on the arithmetic problems, 30 steps of 16 problems x 8 samples.
# A model this small rarely gets an answer right (a few %), so the reward also pays for the format
# ('#### <number>' at the end): a signal RL can show rising in 30 steps.
# MEASURED (2-core AMD EPYC, fp32): 50 s; mean reward (right answer + format) 0.74 -> 0.96 (first / last 5
# steps); held-out format 68% -> 100%, accuracy 4% -> 2% (50 problems: noise).
max_iters = 30
num_prompts = 16
num_samples = 8
max_new_tokens = 48
learning_rate = 3e-4
warmup_iters = 2
format_reward = 1.0
eval_interval = 30
eval_problems = 50
eval_samples = 4
