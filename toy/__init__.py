"""Toy reproductions of the paper's illustrations, run on this repository's model.py, losses.py and reference.py.

bandit.py (one prompt, K responses, shared parameters), sequences.py (a tiny Llama over an enumerable sequence space),
overoptimization.py (gold reward vs KL(π‖π_SFT)), curvature.py (the flattening DPO loss); common.py holds the shared
training loop. Each runs as `python -m toy.NAME [--out DIR] [--quick]` and writes NAME.png and NAME.json.
"""
