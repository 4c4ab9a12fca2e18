# speedrun.sh, gpu preset (NOT MEASURED), stage 2: prepare/tinystories.py tokenizes the first 1 GB of
# TinyStories train (at about 4 bytes per token, 250M tokens: more than the 197M that pretraining reads)
# and 22 MB of val (all of it).
max_train_bytes = 1_000_000_000
max_val_bytes = 22_000_000
