# Pretraining on TinyStories, sized for a laptop CPU: 2.6M parameters (4 layers, dim 192, 4 heads, vocab 4096).
#   python prepare/tokenizer.py --source tinystories --vocab_size 4096 --max_chars 50_000_000
#   python prepare/tinystories.py
#   python train.py config/pretrain_tinystories.py
# 16 batch x 256 block = 4,096 tokens per step; 2,000 steps = 8.2M tokens.
# MEASURED (2-core AMD EPYC, fp32, 2 threads) on the 0.9 MB TinyStories subset of prepare/sample (229K train
# tokens, so only --max_iters=300 = 5 epochs): val loss 3.69 nats/token, 1.31 bits/byte, in 3.5 min of training
# (4.5 min with evaluations) at 5,100-6,900 tokens/s, MFU 50-60% of the measured matmul peak; samples are
# TinyStories-like sentences. The full 2,000 steps take about 25 minutes on the same machine.
out_dir = "out/tinystories"
data = "tinystories"
dim = 192
n_layers = 4
n_heads = 4
block_size = 256
batch_size = 16
learning_rate = 3e-3  # bench/loss_per_second.py: 3e-3 beats 1e-3 at this size
min_lr = 3e-4
warmup_iters = 100
max_iters = 2000
eval_interval = 250
eval_iters = 20
weight_decay = 0.1
