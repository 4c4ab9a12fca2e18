# speedrun.sh, gpu preset (one GPU; NOT MEASURED: no GPU was available when it was written), stage 1:
# prepare/tokenizer.py trains an 8,192-token BPE tokenizer on the first 100M characters of TinyStories train
# (downloaded, 2.2 GB). Expect a few minutes on the CPU: tokenizer training does not use the GPU.
vocab_size = 8192
max_chars = 100_000_000
