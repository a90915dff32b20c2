"""Torch-free names, so the text scripts validate their flags before importing anything heavy."""

TEXT_MODELS = ("biva-lstm", "biva", "lstm-lm", "rnn-vae")
LADDER_MODELS = ("biva-lstm", "biva")  # the shared ladder; the other two are the paper's baselines
LATENT_MODELS = ("biva-lstm", "biva", "rnn-vae")
KL_SCHEDULES = ("free-bits", "warmup")
# KL schedule of each model when --kl-schedule is not given: BIVA's text recipe is free bits on
# plateau; the RNN-VAE row of the paper's Table 7 is the KL warm-up one (Bowman et al. 2015).
DEFAULT_KL_SCHEDULE = {"biva-lstm": "free-bits", "biva": "free-bits", "rnn-vae": "warmup", "lstm-lm": None}
TEXT_PRESETS = ("paper", "small", "tiny")
TOKENIZERS = ("word", "unigram")
# The hub text read when no --train-files are given. The old script dataset `bookcorpus/bookcorpus`
# no longer loads: same text, plain files.
DEFAULT_DATASET = "bookcorpus"
HUB_ALIASES = {"bookcorpus": "rojagtap/bookcorpus", "bookcorpus/bookcorpus": "rojagtap/bookcorpus"}
HUB_FIX = "download the text files and pass --train-files"  # ends every "could not fetch" error
