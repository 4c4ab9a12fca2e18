# speedrun.sh, gpu preset (NOT MEASURED), stage 4: rl.py on the arithmetic problems, 300 steps of 16 problems
# x 16 samples. The learning rate is a tenth of SFT's peak and sampling is at temperature 0.7, as in the CPU
# preset where both were measured (config/speedrun/cpu/rl.py).
max_iters = 300
num_prompts = 16
num_samples = 16
max_new_tokens = 64
learning_rate = 3e-5
temperature = 0.7
warmup_iters = 10
eval_interval = 100
eval_problems = 1000  # all the test problems
eval_samples = 8
