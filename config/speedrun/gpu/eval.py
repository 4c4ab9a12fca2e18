# speedrun.sh, gpu preset (NOT MEASURED), stage 5: eval.py on the base, SFT and RL checkpoints: the full
# validation splits of the benchmarks and all 1,000 arithmetic test problems.
limit = 0  # every item
