"""Experiments built from dpolab's parts: the DPO paper's controlled-sentiment experiment
(`dpolab experiment`), its sweep over a config field (`dpolab sweep`), and their measurements
(`measure`) and outputs (`frontier`: reward-vs-KL plot, tables, HTML sections)."""
