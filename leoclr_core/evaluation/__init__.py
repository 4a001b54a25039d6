"""Evaluating an encoder: k-NN and linear probes on frozen features (`probes`), and the evaluate job (`job`)."""
