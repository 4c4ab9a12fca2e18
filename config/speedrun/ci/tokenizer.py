# speedrun.sh, ci preset (the size of a test; tests/test_speedrun.py runs it), stage 1: prepare/tokenizer.py
# trains a 512-token BPE tokenizer on the first 300K characters of TinyStories train. About 1 s.
vocab_size = 512
max_chars = 300_000
