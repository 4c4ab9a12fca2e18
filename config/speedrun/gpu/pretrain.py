# speedrun.sh, gpu preset, stage 2: train.py pretrains a 27M-parameter model (dim 512, 8 layers, 8 heads of
# which 4 K/V, vocab 8192) on TinyStories. 64 batch x 512 block x 2 accumulation = 65,536 tokens per step;
# 3,000 steps = 197M tokens.
# NOT MEASURED: no GPU was available when this preset was written. Expected: about 30 minutes on one H100 for the
# whole speedrun, of which the download (2.2 GB), tokenizer training and tokenizing take a good part.
data = "tinystories"
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 4
compile = True
block_size = 512
batch_size = 64
gradient_accumulation_steps = 2
max_iters = 3000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
eval_interval = 500
eval_iters = 50
log_interval = 50
