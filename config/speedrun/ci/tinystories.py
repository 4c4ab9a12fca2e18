# speedrun.sh, ci preset, stage 2: prepare/tinystories.py tokenizes the first 400 KB of TinyStories train and
# 100 KB of its val file (whole lines): about one pass for 60 steps of 2,048 tokens (123K tokens).
max_train_bytes = 400_000
max_val_bytes = 100_000
