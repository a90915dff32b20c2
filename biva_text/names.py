"""Torch-free names, so the text scripts validate their flags before importing anything heavy."""

TEXT_MODELS = ("biva-lstm", "biva", "lstm-lm", "rnn-vae", "hybrid-vae", "hybrid-vae-conv")
LADDER_MODELS = ("biva-lstm", "biva")  # the shared ladder; the others are the paper's baselines
HYBRID_MODELS = ("hybrid-vae", "hybrid-vae-conv")  # Semeniuta et al. (2017), with and without the LSTM
NON_AUTOREGRESSIVE = ("biva", "hybrid-vae-conv")  # tokens predicted from the features directly, no LSTM
LATENT_MODELS = ("biva-lstm", "biva", "rnn-vae", "hybrid-vae", "hybrid-vae-conv")
KL_SCHEDULES = ("free-bits", "warmup")
# KL schedule of each model when --kl-schedule is not given: BIVA's text recipe is free bits on
# plateau; the RNN-VAE row of the paper's Table 7 is the KL warm-up one (Bowman et al. 2015), and the
# Hybrid VAE was trained with KL annealing too (Semeniuta et al. 2017).
DEFAULT_KL_SCHEDULE = {"biva-lstm": "free-bits", "biva": "free-bits", "rnn-vae": "warmup", "lstm-lm": None,
                       "hybrid-vae": "warmup", "hybrid-vae-conv": "warmup"}
# How the LSTM decoder reads its conditioning (BIVA's d_0, the RNN-VAE's z, the Hybrid VAE's
# features) at every step ("none": not at all, only through attention or the initial state), and how
# its state starts; the first of each is the original behaviour.
DECODER_INPUTS = ("concat", "scaled", "normalised", "none")
DECODER_INITS = ("zeros", "latents")
TEXT_PRESETS = ("paper", "small", "quick", "tiny")
TOKENIZERS = ("word", "unigram")
# The hub text read when no --train-files are given. The old script dataset `bookcorpus/bookcorpus`
# no longer loads: same text, plain files.
DEFAULT_DATASET = "bookcorpus"
HUB_ALIASES = {"bookcorpus": "rojagtap/bookcorpus", "bookcorpus/bookcorpus": "rojagtap/bookcorpus"}
HUB_FIX = "download the text files and pass --train-files"  # ends every "could not fetch" error
# Corpora shipped with the package (biva_text/corpora/), read offline: --dataset NAME.
BUNDLED_DATASETS = ("austen",)
# What a bundled corpus changes when its flags are not given: the preset (a CPU-sized one, as image
# size picks an image preset) and the carved held-out splits (1000 sentences each, as
# benchmarks/real_text.py carves them, instead of a tenth of the corpus).
DATASET_PRESET = {"austen": "quick"}
DATASET_HELDOUT_SIZE = {"austen": 1000}
