# speedrun.sh, cpu preset (the 2-core CPU run), stage 1: prepare/tokenizer.py trains the byte-level BPE
# tokenizer on the start of TinyStories train. On the sample (the default) that is its whole 0.9 MB subset
# (about 1 s); with --data_dir=download, the first 20 MB of the 2.2 GB official file (only those are fetched).
vocab_size = 4096  # about 4.1 bytes of TinyStories per token (229K tokens for the 0.9 MB subset)
max_chars = 20_000_000  # the same text prepare/tinystories.py tokenizes for pretraining (tinystories.py here)
