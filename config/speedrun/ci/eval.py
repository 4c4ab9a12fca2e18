# speedrun.sh, ci preset, stage 5: eval.py on the base, SFT and RL checkpoints: bits per byte and three
# benchmarks (at chance level for 0.13M parameters), and the arithmetic problems as a chat. About 20 s.
limit = 50  # the first 50 items of each task, and the first 50 arithmetic test problems
