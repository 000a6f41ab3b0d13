import os

# Tests never touch the network.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# One intra-op thread: tiny models gain nothing from two, and two threads thrash when the other core is busy.
os.environ.setdefault('OMP_NUM_THREADS', '1')
