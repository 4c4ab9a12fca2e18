# speedrun.sh, ci preset, stage 3: train.py fine-tunes the tiny model on Alpaca, identity and arithmetic
# conversations (identity and arithmetic shown twice per epoch). 250 steps of 16 x 128 tokens.
# MEASURED (2-core AMD EPYC, fp32): 13 s; val loss 9.17 -> 1.77; arithmetic answers in the '#### <number>'
# format 0% (base) -> 68% (tests/test_speedrun.py asks for at least 50%).
data = "alpaca,identity:2,arith:2"
block_size = 128
batch_size = 16
max_iters = 250
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 10
eval_interval = 50
eval_iters = 4
log_interval = 10
