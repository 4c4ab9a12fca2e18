# speedrun.sh, cpu preset, stage 5: eval.py on the base, SFT and RL checkpoints, twice each: bits per byte on
# TinyStories val plus OpenBookQA, ARC-Easy and ARC-Challenge (validation splits), then the arithmetic test
# problems asked as a chat with the calculator. MEASURED: 3m00s for all six; the benchmarks sit at chance level
# (OpenBookQA 15-25%, ARC-Easy 24-28%, ARC-Challenge 21-23%), as expected of 2.6M parameters; arithmetic
# accuracy is in rl.py here.
limit = 0  # every item: the validation splits (on the sample: 300 OpenBookQA, 300 ARC-Easy, 299 ARC-Challenge)
#           and all 400 arithmetic problems (standard error ~2 points)
