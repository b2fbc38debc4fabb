"""Models of self-guided latent diffusion: the KL autoencoder, the guided UNet, conditioning.

Submodules are imported on use (``from sgdm.models.unet import UNet``) so that
loading a config does not import torch.
"""
