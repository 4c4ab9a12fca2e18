# speedrun.sh, gpu preset (NOT MEASURED), stage 3: train.py fine-tunes the pretrained model for one epoch of
# Alpaca, identity (shown 8 times) and arithmetic conversations, 32 x 512 tokens per step.
data = "alpaca,identity:8,arith"
block_size = 512
batch_size = 32
num_epochs = 1.0
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 50
eval_interval = 200
eval_iters = 20
log_interval = 20
