# RL on GSM8K with the calculator, on one GPU: improve an SFT chat model on grade-school math from its own
# checked answers. Prepare the problems (GSM8K's train and test splits, normalized) and an SFT model that
# already answers in GSM8K's format (prepare/chat.py gsm8k renders the solutions with calculator calls and a
# final '#### <answer>', which is what rl.py's checker reads):
#   python prepare/tasks.py --tasks gsm8k                      # data/tasks/gsm8k/{train,test}.jsonl
#   python rl.py config/rl.py --init_from=out/sft/best.pt
# 16 problems x 16 samples = 256 replies of up to 256 tokens per step; 500 steps = 8,000 problems, about one
# pass over GSM8K train. RL only sharpens what the model can already do sometimes: a problem whose 16 replies
# are all wrong teaches nothing, so check pass@16 first (--eval_only=True); a model that never solves a
# GSM8K problem (most models under ~100M parameters) gets no signal here, and the arithmetic task
# (config/rl_arith.py) is the place to watch RL work.
# NOT MEASURED: no GPU was available when this recipe was written; the figures in the README are the CPU
# arithmetic run's. Do not tune on the test split you report: hold out part of train (eval_split) for that.
out_dir = "out/rl_gsm8k"
init_from = "out/sft/best.pt"
task_dir = "data/tasks/gsm8k"
train_split = "train"
eval_split = "test"
eval_problems = 400  # a standard error of about 2 points at 30% accuracy
eval_samples = 8
eval_interval = 50
num_prompts = 16
num_samples = 16
max_new_tokens = 256
temperature = 1.0
learning_rate = 1e-5  # full fine-tuning of an SFT model: small steps, or it forgets how to write
warmup_iters = 10
max_iters = 500
kl_coef = 0.0  # the KL penalty is there if the replies drift into nonsense (0.01-0.05), at the cost of a frozen copy
format_reward = 0.0
