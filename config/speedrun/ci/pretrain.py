# speedrun.sh, ci preset, stage 2: train.py pretrains a 0.13M-parameter model (dim 64, 2 layers, vocab 512).
# 16 batch x 128 block = 2,048 tokens per step; 60 steps = 123K tokens.
# MEASURED (2-core AMD EPYC, fp32, on the TinyStories of prepare/sample): 8 s; train loss 6.24 -> 5.10, val loss
# 6.25 -> 5.13 (3.12 bits/byte) at 53K tokens/s.
data = "tinystories"
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
block_size = 128
batch_size = 16
max_iters = 60
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 10
eval_interval = 20
eval_iters = 4
log_interval = 5
