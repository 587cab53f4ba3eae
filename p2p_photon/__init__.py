"""p2p_photon: peer-to-peer, serverless federated pre-training of decoder-only LLMs."""

__version__ = "0.1.0"
