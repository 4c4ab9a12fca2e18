# Pretraining on TinyStories, sized for one GPU: ~27M parameters (8 layers, dim 512, 8 heads of which 4 K/V).
#   python prepare/tinystories.py                       (the full V2-GPT4 train/valid split)
#   python train.py config/pretrain_tinystories_gpu.py
# 64 batch x 512 block x 2 accumulation = 65,536 tokens per step; 10,000 steps = 655M tokens (~1.4 epochs).
# UNMEASURED: no GPU was lent to the session that wrote it. By FLOPs (6 x 27M + attention ~ 0.2 GFLOP/token,
# ~130 PFLOP in all) expect about an hour on an A100 at 35% MFU; llama2.c's 15M stories model reaches val loss
# ~1.07 on its 32K vocab with a similar budget. Update this comment with the loss and time you measure.
out_dir = "out/tinystories_gpu"
data = "tinystories"
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 4
block_size = 512
batch_size = 64
gradient_accumulation_steps = 2
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 500
max_iters = 10000
eval_interval = 500
eval_iters = 50
weight_decay = 0.1
dtype = "auto"  # bfloat16 on GPUs that have it
compile = True
