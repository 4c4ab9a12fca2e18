# speedrun.sh, cpu preset, stage 2: train.py pretrains a 2.56M-parameter Llama on TinyStories.
# 16 batch x 256 block = 4,096 tokens per step; 300 steps = 1.23M tokens.
# MEASURED (2-core AMD EPYC, fp32, on the sample, so 5 passes over its 0.9 MB subset): 3m54s;
# train loss 8.37 -> 3.25, best val loss 3.67 (1.31 bits/byte) at 6.5K tokens/s.
data = "tinystories"
dim = 192
n_layers = 4
n_heads = 4
block_size = 256
batch_size = 16
max_iters = 300
learning_rate = 3e-3  # bench/loss_per_second.py: 3e-3 beats 1e-3 at this size
min_lr = 3e-4
warmup_iters = 30
eval_interval = 50
eval_iters = 10
log_interval = 10
