# speedrun.sh, cpu preset, stage 2: prepare/tinystories.py tokenizes the first 20 MB of TinyStories train and
# 1 MB of its val file (whole lines). 300 pretraining steps of 4,096 tokens read 1.2M tokens, about 5 MB of text:
# 20 MB (--data_dir=download fetches just those) never repeats a story. The sample's subset (the default) is
# only 0.9 MB (229K tokens) and 0.8 MB of val, so there pretraining makes about 5 passes over it.
max_train_bytes = 20_000_000
max_val_bytes = 1_000_000  # the val split of pretraining and the text of the bits-per-byte evaluation
